"""bfloat16 and int8 against float32, on a tiny Doge trained on stdlib prose and scored on the pydoc eval text.

Teacher-forced over 2,048 positions: top-1 agreement with float32, over all positions and over those where
float32's top two logits differ by at least `DECIDED_MARGIN` (a tiny model has many near-ties, which any
rounding flips: bfloat16 itself disagrees on ~1.5 % of all positions, every one of them a near-tie), and
perplexity. Then the static decode step on the converted model computes what the converted model's own forward
computes, and servers started with `--dtype bfloat16` and `--quantize int8` answer greedy requests close to
float32's `generate`. Measured on torch 2.13 (2-core AMD EPYC, avx512_bf16 + avx512_vnni), bound below with
room for another CPU's rounding: top-1 99.22-99.56 % (bf16 99.56, w8a16 99.22, w8a8 99.46 with its activations
in two 8-bit digits; 98.00 % with one), 100 % past the margin, perplexity within 0.15 %. On the 2-core Intel Xeon
(model 207), with one digit: top-1 97.6 % for w8a8, 99.88 % past the margin.
"""

from __future__ import annotations

import copy
import math
import os
import re

import httpx

import pytest
import torch

from serve import packed_linear
from serve.decode_step import DecodeStep
from serve.kv_batch import KVBatch
from serve.quantize import ANY_ROWS, Int8Linear, available, quantize_head, quantize_linears
from serve.static_cache import SlotBatch

from serve_fixtures import ServerProcess, metric

# the goal, met with the head's leaders in float32 (serve/exact_head.py): w8a16 99.22 %, w8a8 99.46 %
TOP1 = {"w8a16": 0.99, "w8a8": 0.99}
TOP1_OTHER = 0.97  # bf16 (99.56 %): its layers round activations and weights to bfloat16
DECIDED_MARGIN = 0.1
# 2-core Intel Xeon (model 207), scoring on 2 threads: w8a8 flips 2 of ~1,700 positions past the margin (99.88 %),
# at margins below twice its max |dlogit| (0.16): within its error, not a kernel fault.
TOP1_DECIDED = 0.998
PERPLEXITY_REL = 0.01  # the goal
STEP_ATOL = {"bf16": 0.05, "w8a16": 0.05, "w8a8": 0.05}  # step vs forward of the same converted model


def variants() -> list[str]:
    found = ["bf16"] if packed_linear.available(torch.bfloat16) else []
    return found + list(available())


@pytest.fixture(scope="module")
def trained():
    """(model, tokenizer, eval ids [16, 128]): trained on one thread, so the weights are the same on any box."""
    from serve_testing import pydoc_eval_text, train_tiny_doge

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = train_tiny_doge()
    finally:
        torch.set_num_threads(threads)
    ids = tokenizer("\n\n".join(pydoc_eval_text()))["input_ids"]
    return model, tokenizer, torch.tensor(ids[: 16 * 128]).view(16, 128)


def convert(model, variant: str):
    """A copy holding its linears as the server does for `variant`; int8 on that one kernel at every batch size."""
    model = copy.deepcopy(model)
    if variant == "bf16":  # every linear in bf16 (the bound) but the head, int8 with float32 leaders as served
        quantize_head(model)  # None (head left bf16) where no int8 kernel runs, as in the server
        return model, DecodeStep(model, packed=True, dtype=torch.bfloat16)
    quantize_linears(model)
    step = DecodeStep(model)
    for m in [*model.modules(), *step.fused_layers(Int8Linear)]:
        if isinstance(m, Int8Linear):
            m.set_table([(ANY_ROWS, variant)])
    return model, step


def scores(model, ids):
    with torch.inference_mode():
        logits = model(ids).logits.float()  # [B, T, V]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return logits, math.exp(float(nll))


@pytest.mark.parametrize("variant", variants())
def test_agreement_and_perplexity_against_float32(trained, variant):
    model, _, ids = trained
    ref, ppl = scores(model, ids)
    assert ppl < 200  # it learned something: uniform over the 512 tokens is 512
    got, vppl = scores(convert(model, variant)[0], ids)
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) >= DECIDED_MARGIN
    same = got.argmax(-1) == ref.argmax(-1)
    top1, top1_decided = float(same.float().mean()), float(same[decided].float().mean())
    print(f"{variant} vs float32 over the pydoc eval text: top-1 {top1 * 100:.2f} % ({top1_decided * 100:.2f} % "
          f"where the margin >= {DECIDED_MARGIN}, {float(decided.float().mean()) * 100:.1f} % of positions), "
          f"perplexity {vppl:.3f} vs {ppl:.3f}, max |dlogit| {float((got - ref).abs().max()):.3f}")
    assert top1 >= TOP1.get(variant, TOP1_OTHER) and top1_decided >= TOP1_DECIDED, (top1, top1_decided)
    assert abs(vppl / ppl - 1) <= PERPLEXITY_REL, (vppl, ppl)


@pytest.mark.parametrize("variant", variants())
def test_static_step_computes_the_converted_forward(trained, variant):
    """The step's products are the forward's (same modules); the rest runs in float32 in both."""
    model, _, ids = trained
    converted, step = convert(model, variant)
    prompt = ids[0, :40].tolist()
    with torch.inference_mode():
        want = converted(torch.tensor([prompt])).logits[0, 29:39].float()  # next-token logits after 30..39 tokens
    batch = SlotBatch(step, slots=2, max_len=256)
    prefill, first = KVBatch(converted).prefill([prompt[:30]])
    batch.merge(prefill)
    got = torch.stack([first[0]] + [batch.decode([t])[0] for t in prompt[30:39]])
    torch.testing.assert_close(got, want, atol=STEP_ATOL[variant], rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("flags", [("--dtype", "bfloat16"), ("--quantize", "int8")], ids=["bf16", "int8"])
def test_servers_answer_close_to_float32_generate(trained, flags, tmp_path):
    """Greedy completions of 8 pydoc prompts through a real server against float32 `generate`: most tokens
    before the first divergence agree, and the first token almost always does."""
    import openai

    model, tokenizer, ids = trained
    if flags[0] == "--dtype" and "bf16" not in variants() or flags[0] == "--quantize" and not available():
        pytest.skip(f"{flags} does not run here")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompts = [ids[i, :24].tolist() for i in range(8)]
    new = 16
    with torch.inference_mode():
        want = [model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    # Default threads: on a multi-core box each step runs on every core or on one, by timing (serve/threads.py).
    server = ServerProcess(tmp_path / "model", tmp_path / "server.log", "--max-batch", "8", *flags)
    try:
        server.wait_ready()
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            r = client.completions.create(model="tiny-doge", prompt=prompts, max_tokens=new, temperature=0,
                                          logprobs=0, extra_body={"ignore_eos": True})
        steps = metric(server, "doge_serve_decode_steps_total")
        by_threads = httpx.get(server.url + "/metrics", timeout=5).text
    finally:
        server.stop()
    if len(os.sched_getaffinity(0)) > 1:
        counts = re.findall(r'doge_serve_decode_steps_by_threads_total\{threads="(\d+)"\} ([0-9.e+]+)', by_threads)
        assert {t for t, _ in counts} <= {"1", str(len(os.sched_getaffinity(0)))} and counts, by_threads
        assert sum(float(c) for _, c in counts) == steps
    got = [c.logprobs.tokens for c in sorted(r.choices, key=lambda c: c.index)]  # each token's own text
    want = [[tokenizer.decode([t]) for t in w] for w in want]
    prefix = [next((k for k, (a, b) in enumerate(zip(g, w)) if a != b), new) for g, w in zip(got, want)]
    print(f"{flags}: tokens agreeing with float32 generate before the first divergence, per prompt: {prefix}")
    assert sum(p > 0 for p in prefix) >= 7 and sum(prefix) >= 0.6 * new * len(prompts), prefix
