"""The batching engine in-process: batched decoding equals one-at-a-time decoding, rows join and leave freely,
sampling is per-row and seeded per request, and cancelled requests leave the batch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.engine import Engine, Overloaded
from serve.kv_batch import KVBatch
from serve.sampling import RowState, RequestSampling, make_generator, sample

from serve_fixtures import tiny_model_dir  # noqa: F401  (pytest fixture)

ATOL = 1e-4  # float32 logits of a 2-layer model: batched vs single differ by ~1e-7


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `python -m serve` does; restored for whatever tests run next in this process
    yield AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.set_num_threads(threads)


def reference_logits(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Next-token logits after prompt + continuation[:k] for every k, from one cache-free forward. [len+1, V]"""
    ids = torch.tensor([prompt + continuation])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 :]


def test_rows_joining_and_leaving_match_full_forward(model_and_tokenizer):
    model, _ = model_and_tokenizer
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (3, 11, 6)]
    produced: list[list[int]] = [[], [], []]
    logits_seen: list[list[torch.Tensor]] = [[], [], []]
    batch, rows = KVBatch(model), []

    def join(i):
        new, logits = KVBatch(model).prefill([prompts[i]])
        batch.merge(new)
        rows.append(i)
        step_out(i, logits[0])

    def step_out(i, logits):
        logits_seen[i].append(logits)
        produced[i].append(int(torch.randint(5, 500, (1,), generator=g)))  # any token: teacher forcing

    join(0)
    for step in range(9):
        if step == 2:
            join(1)
        if step == 4:
            join(2)
        if step == 6:  # row 0 leaves; the cache drops its columns
            keep = [k for k, i in enumerate(rows) if i != 0]
            batch.select(keep)
            rows = [rows[k] for k in keep]
        logits = batch.decode([produced[i][-1] for i in rows])
        for k, i in enumerate(rows):
            step_out(i, logits[k])
    for i in range(3):
        ref = reference_logits(model, prompts[i], produced[i][:-1])
        got = torch.stack(logits_seen[i])
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_batched_prefill_with_left_padding_and_repeat(model_and_tokenizer):
    model, _ = model_and_tokenizer
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]
    batch, logits = KVBatch(model).prefill(prompts)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], reference_logits(model, p, [0])[0], atol=ATOL, rtol=0)
    batch.repeat_rows([2, 1])
    assert batch.rows == 3
    out = batch.decode([20, 21, 22])
    torch.testing.assert_close(out[1], reference_logits(model, prompts[0], [21, 0])[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], reference_logits(model, prompts[1], [22, 0])[1], atol=ATOL, rtol=0)


def test_sampling_is_per_row_and_seeded():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [RequestSampling(max_tokens=1, temperature=0.0), RequestSampling(max_tokens=1, top_k=1),
              RequestSampling(max_tokens=1, temperature=1.0, seed=5)]
    rows = [RowState(p, make_generator(p.seed), [1, 2]) for p in params]
    first = sample(logits, rows, eos_ids=[]).token_ids
    assert first[0] == int(logits[0].argmax()) and first[1] == int(logits[1].argmax())
    same = logits[2:].repeat(3, 1)  # [3, V]
    again = sample(same, [RowState(params[2], make_generator(5), [1, 2]) for _ in range(3)], eos_ids=[]).token_ids
    assert again == [first[2]] * 3  # the same seed draws the same token on any row


def test_filters_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    for p, allowed in [(RequestSampling(max_tokens=1, top_k=2), {0, 1}),
                       (RequestSampling(max_tokens=1, top_p=0.5), {0}),
                       (RequestSampling(max_tokens=1, min_p=0.3), {0, 1})]:
        seen = {sample(logits, [RowState(p, make_generator(s), [])], []).token_ids[0] for s in range(40)}
        assert seen <= allowed and len(seen) == len(allowed)
    p = RequestSampling(max_tokens=1, temperature=0.0, repetition_penalty=100.0)
    assert sample(logits, [RowState(p, make_generator(0), [0])], []).token_ids == [1]
    p = RequestSampling(max_tokens=1, temperature=0.0, ignore_eos=True)
    assert sample(logits, [RowState(p, make_generator(0), [])], eos_ids=[0]).token_ids == [1]


def test_logit_bias_is_added_to_its_row_before_sampling():
    """OpenAI's logit_bias, per row: -100 bans the leader (greedy takes the runner-up), +100 makes a token certain
    when sampled at temperature 1, and a row without a bias keeps its own argmax."""
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    leader, runner_up = logits[0].topk(2).indices.tolist()
    params = [RequestSampling(max_tokens=1, temperature=0.0, logit_bias=((leader, -100.0),)),
              RequestSampling(max_tokens=1, temperature=1.0, logit_bias=((3, 100.0), (4, -5.0))),
              RequestSampling(max_tokens=1, temperature=0.0)]
    for seed in range(5):
        rows = [RowState(p, make_generator(seed), [1]) for p in params]
        assert sample(logits, rows, eos_ids=[]).token_ids == [runner_up, 3, int(logits[2].argmax())]


def test_penalties_and_eos_masks_touch_only_their_rows_and_a_copy_unless_inplace():
    """Rows 0 and 2 may not stop yet (ignore_eos, min_tokens), row 1 has a repetition penalty, row 3 nothing: the
    same tokens whether `sample` edits a copy or, `inplace`, the logits themselves (the engine's own step output),
    where only the edited rows change."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=g)
    logits[:, 7] = 50.0  # the eos id leads every row
    logits[1, 5] = 60.0  # row 1's seen token leads it more
    params = [RequestSampling(max_tokens=4, temperature=0.0, ignore_eos=True),
              RequestSampling(max_tokens=4, temperature=0.0, repetition_penalty=100.0),
              RequestSampling(max_tokens=4, temperature=0.0, min_tokens=2),
              RequestSampling(max_tokens=4, temperature=0.0)]
    rows = [RowState(p, make_generator(0), [5], output_ids=[9] if i == 2 else []) for i, p in enumerate(params)]
    masked = logits.clone()
    masked[[0, 2], 7] = float("-inf")
    expected = [int(masked[0].argmax()), 7, int(masked[2].argmax()), 7]  # row 1: 60 / 100 < 50, eos allowed
    before = logits.clone()
    assert sample(logits, rows, eos_ids=[7]).token_ids == expected
    assert torch.equal(logits, before)  # a copy was edited
    assert sample(logits, rows, eos_ids=[7], inplace=True).token_ids == expected
    assert torch.equal(logits[3], before[3]) and torch.equal(logits[[0, 2]], masked[[0, 2]])
    assert float(logits[1, 5]) == pytest.approx(60.0 / 100.0)


def test_a_step_wakes_each_event_loop_once_for_all_its_requests(model_and_tokenizer):
    """Four requests decoding together: each step's deltas reach the loop in one `call_soon_threadsafe`."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch=4, threads=1)
    engine.start()
    calls = []

    async def run():
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback, *args):
            calls.append(len(args[0]) if args and isinstance(args[0], list) else 1)
            return original(callback, *args)

        loop.call_soon_threadsafe = counting
        with engine._cond:  # queue all four before the engine thread can admit the first one alone
            handles = [engine.submit([[5 + i, 6, 7]], RequestSampling(max_tokens=6, temperature=0.0, ignore_eos=True))
                       for i in range(4)]
        return [[d async for d in h.deltas()] for h in handles]

    try:
        results = asyncio.run(run())
    finally:
        engine.stop()
    assert all(sum(len(batch) for batch in r) == 6 for r in results)
    assert calls == [4] * 6  # the prefill's first tokens, then five decode steps: one wake-up each, four deltas


def test_engine_batches_cancels_and_bounds_the_queue(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch=4, max_queue=2, threads=1)

    async def run():
        long = RequestSampling(max_tokens=450, temperature=0.0, ignore_eos=True)
        handles = [engine.submit([[5, 6, 7 + i]], long) for i in range(4)]  # all queued before the worker runs
        waiting = engine.submit([[9]], RequestSampling(max_tokens=3, ignore_eos=True), n=2)
        with pytest.raises(Overloaded):
            engine.submit([[9]], RequestSampling(max_tokens=3))
        engine.start()
        streams = [h.deltas() for h in handles]
        for _ in range(2):  # the first deltas come from the prefill, the second from a decode step
            await asyncio.gather(*(s.__anext__() for s in streams))
        assert engine.peak_rows == 4  # prefilled together, decoded as one batch of four
        for h in handles:
            h.cancel()
        texts = ["".join(d.text for batch in [x async for x in waiting.deltas()] for d in batch)]
        assert waiting.completion_tokens == 6 and texts
        for s in streams:
            await s.aclose()
        for _ in range(100):
            if engine.num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.num_running == 0 and engine._in_flight == 0
        assert all(h.completion_tokens < 450 for h in handles)

    try:
        asyncio.run(run())
    finally:
        engine.stop()


def test_only_the_engine_thread_runs_torch_on_several_cores(tiny_model_dir, monkeypatch):
    """libgomp keeps a team of workers for every thread that ever ran a parallel region, and with more of them than
    cores it cuts their spinning short, which made a 2-thread decode step 3x slower (Engine.start). So the engine
    leaves its caller's torch thread count alone and measures the int8 kernels, warms up and decodes on its own
    thread, at its own count."""
    import threading

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import serve.engine as engine_module
    from serve.quantize import available

    if not available():
        pytest.skip("no int8 kernel runs on this CPU")
    seen = []
    choose = engine_module.kernel_choice.choose

    def recording_choose(*args, **kwargs):
        seen.append(("int8 kernels", threading.current_thread().name, torch.get_num_threads()))
        return choose(*args, **kwargs)

    monkeypatch.setattr(engine_module.kernel_choice, "choose", recording_choose)
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        engine = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), max_batch=2, threads=2,
                        quantize="int8")
        decode_step = engine._decode_step

        def recording_step():
            seen.append(("decode", threading.current_thread().name, torch.get_num_threads()))
            decode_step()

        engine._decode_step = recording_step
        assert torch.get_num_threads() == 1 and not seen  # nothing measured on the caller's thread
        engine.start()
        assert torch.get_num_threads() == 1

        async def run():
            handle = engine.submit([[5, 6, 7]], RequestSampling(max_tokens=4, temperature=0.0, ignore_eos=True))
            return [d async for d in handle.deltas()]

        try:
            asyncio.run(run())
        finally:
            engine.stop()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(caller)
    assert seen[0] == ("int8 kernels", "serve-engine", 2)
    assert {s[0] for s in seen} == {"int8 kernels", "decode"}
    assert all(name == "serve-engine" and threads == 2 for _, name, threads in seen), seen


def test_thread_chooser_runs_the_faster_count_and_keeps_trying_the_other():
    """Fed step times where 2 threads are faster at 1 row and 1 thread at 8 rows (a loaded box), it settles on
    each per batch-size class, tries the other count once every EXPLORE_EVERY steps or so, and follows a change."""
    from serve.threads import EXPLORE_EVERY, ThreadChooser

    g = torch.Generator().manual_seed(7)
    chooser = ThreadChooser([1, 2])
    cost = {(1, 1): 4.0, (1, 2): 2.5, (8, 1): 6.0, (8, 2): 9.0}  # ms per step, made noisy below
    picks = {1: [], 8: []}
    for _ in range(10 * EXPLORE_EVERY):
        for rows in (1, 8):
            threads = chooser.choose(rows)
            picks[rows].append(threads)
            chooser.record(rows, threads, cost[rows, threads] * float(1 + 0.1 * torch.rand(1, generator=g)))
    settled = {rows: p[2 * EXPLORE_EVERY:] for rows, p in picks.items()}
    for rows, slower in ((1, 1), (8, 2)):  # the slower count once every `interval` steps (EXPLORE_EVERY or a bit more)
        assert EXPLORE_EVERY <= chooser.interval(rows) < 2 * EXPLORE_EVERY
        assert settled[rows].count(slower) == pytest.approx(len(settled[rows]) / chooser.interval(rows), abs=1.01)
    assert chooser.used[1] + chooser.used[2] == 20 * EXPLORE_EVERY
    cost[1, 2] = 20.0  # the box got busy: two threads became slow at 1 row too
    for _ in range(3 * EXPLORE_EVERY):
        threads = chooser.choose(1)
        chooser.record(1, threads, cost[1, threads])
    assert chooser.choose(1) == 1


def test_thread_chooser_is_not_moved_by_single_slow_steps():
    """Single steps several times slower than the rest (a neighbour's burst, the other core's worker waking up)
    do not move the estimate: on 2 threads at 12 ms a step with every 4th step at 60 ms, against 20 ms on 1
    thread, it stays on 2 threads; when most 2-thread steps turn slow it leaves them."""
    from serve.threads import ThreadChooser

    chooser = ThreadChooser([1, 2])
    picks = []
    for i in range(400):
        threads = chooser.choose(1)
        picks.append(threads)
        chooser.record(1, threads, 0.020 if threads == 1 else (0.060 if i % 4 == 0 else 0.012))
    assert picks[100:].count(2) > 0.9 * 300
    for i in range(100):
        threads = chooser.choose(1)
        chooser.record(1, threads, 0.020 if threads == 1 else (0.012 if i % 4 == 0 else 0.060))
    assert chooser.choose(1) == 1


def test_thread_chooser_tries_a_much_slower_count_more_rarely():
    """When the other count is 3x slower (2 threads behind an HTTP client on 2 cores), trying it every
    EXPLORE_EVERY steps would cost ~6 % of the time: it is tried so that it costs at most EXPLORE_COST, and never
    less often than every MAX_EXPLORE_EVERY steps."""
    from serve.threads import EXPLORE_COST, EXPLORE_EVERY, MAX_EXPLORE_EVERY, ThreadChooser

    for slow, every in ((6.0, 100), (2.4, EXPLORE_EVERY), (100.0, MAX_EXPLORE_EVERY)):
        chooser = ThreadChooser([1, 2])
        cost = {1: 2.0, 2: slow}
        picks = []
        for _ in range(4000):
            threads = chooser.choose(1)
            picks.append(threads)
            chooser.record(1, threads, cost[threads])
        assert chooser.interval(1) == every, slow
        tries = picks[1000:].count(2)
        assert tries == pytest.approx(3000 / every, abs=1.01), slow
        if EXPLORE_EVERY < every < MAX_EXPLORE_EVERY:  # the extra time is EXPLORE_COST of the steps' time
            assert tries * (slow - 2.0) <= EXPLORE_COST * 3000 * 2.0 + slow, slow


def test_argmax_rows_is_torch_argmax_with_ties_infinities_and_nan():
    from serve.sampling import argmax_rows

    g = torch.Generator().manual_seed(11)
    for vocab in (32768, 512, 1000):  # 1000: not a multiple of the chunk, torch's own argmax
        logits = torch.randn(9, vocab, generator=g)
        logits[1] = torch.randint(0, 3, (vocab,), generator=g).float()  # many exact ties of the maximum
        logits[2] = float("-inf")
        logits[3, vocab // 2] = float("inf")
        logits[4, vocab - 1] = float("nan")
        logits[5, 7] = logits[5, vocab - 3] = 100.0  # the same maximum in two chunks: the first wins
        assert argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist(), vocab
