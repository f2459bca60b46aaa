"""The static decode path (fixed KV-cache slots + the hand-written step).

Greedy tokens must equal transformers' `generate` on each prompt alone (float32), with rows joining and leaving at
any step, prompts longer than `keep_window_size` (the DMA top-k path) and a cache that grows past one chunk; the
engine must give the same through concurrent requests; the server warms up (and, with int8, measures its
kernels) before /health answers. bfloat16 and int8 against float32: test_serve_quality.py.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time

import httpx
import pytest
import torch
from transformers import DogeConfig, DogeForCausalLM

from serve.decode_step import DecodeStep
from serve.fused import FusedPart, fuse_in_place
from serve.engine import Engine
from serve.kv_batch import KVBatch
from serve.sampling import RequestSampling
from serve.static_cache import CHUNK, SlotBatch

from serve_fixtures import ServerProcess, tiny_model_dir  # noqa: F401  (pytest fixture)

VOCAB = 512
WINDOW = 16  # keep_window_size: every prompt below but one is longer, so the top-k mask is exercised


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_doge(seed: int = 0, **overrides) -> DogeForCausalLM:
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, keep_window_size=WINDOW,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = DogeForCausalLM(DogeConfig(**kwargs)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.A.normal_(0.0, 0.5)  # A = 0 makes every dt equal: a top-k of ties
    return model


def distinct_prompt(n: int, seed: int) -> list[int]:
    """Distinct tokens: dt depends only on a key's token at layer 0, so repeats would tie in the top-k."""
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def greedy_generate(model, prompt: list[int], new: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt) :].tolist()


def static_greedy(model, step: DecodeStep, prompt: list[int], new: int) -> list[int]:
    """`new` greedy tokens of one row: prefill through `model`'s forward, then `step` one token at a time."""
    batch = SlotBatch(step, slots=1, max_len=len(prompt) + new + 8)
    prefill, logits = KVBatch(model).prefill([prompt])
    batch.merge(prefill)
    tokens = [int(logits[0].argmax())]
    while len(tokens) < new:
        tokens.append(int(batch.decode([tokens[-1]])[0].argmax()))
    return tokens


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "cdmoe"])
def test_slots_joining_and_leaving_decode_what_generate_decodes(moe):
    overrides = dict(is_moe=True, num_experts=64, num_experts_per_tok=4) if moe else {}
    model = random_doge(seed=1, **overrides)
    new = 20
    # (prompt length, step it joins at, step it leaves at); 250 + 20 crosses the first CHUNK of cache columns.
    # One prefill per join step: transformers' CDMoE routes a multi-row prefill with scores mixed across rows, so
    # only a one-prompt prefill is generate's; the dense model also prefills two prompts together.
    plan = [(3, 0, new), (40, 0 if not moe else 1, 9), (CHUNK - 6, 2, new + 2), (25, 9, new + 9)]
    prompts = [distinct_prompt(n, seed=i) for i, (n, _, _) in enumerate(plan)]
    expected = [greedy_generate(model, p, new) for p in prompts]
    batch = SlotBatch(DecodeStep(model), slots=3, max_len=1024)
    produced: dict[int, list[int]] = {}
    order: list[int] = []  # request index of each batch row
    for step in range(new + 10):
        leaving = [r for r, i in enumerate(order) if plan[i][2] == step]
        if leaving:
            batch.select([r for r in range(len(order)) if r not in leaving])
            order = [i for r, i in enumerate(order) if r not in leaving]
        joining = [i for i, (_, join, _) in enumerate(plan) if join == step]
        if joining:
            prefill, logits = KVBatch(model).prefill([prompts[i] for i in joining])
            batch.merge(prefill)
            for i, row in zip(joining, logits):
                produced[i] = [int(row.argmax())]
            order += joining
        live = [i for i in order if len(produced[i]) < new]  # rows that joined this step decode at once too
        if live:
            logits = batch.decode([produced[i][-1] for i in order])
            for r, i in enumerate(order):
                if i in live:
                    produced[i].append(int(logits[r].argmax()))
    assert batch.cache.capacity == 2 * CHUNK  # grew once, for the long prompt
    assert sorted(batch.slot_of_row) == []  # everyone left; slot 3 was never needed
    for i, (n, join, leave) in enumerate(plan):
        done = min(new, leave - join)
        assert produced[i][:done] == expected[i][:done], f"request {i} (prompt {n}) diverged"
        assert len(produced[i]) >= done


@pytest.mark.parametrize("tied, bias", [(False, False), (True, False), (False, True)],
                         ids=["untied", "tied", "biases"])
@pytest.mark.parametrize("packed", [False, True], ids=["column-major", "onednn-packed"])
def test_decode_step_weight_layouts_keep_the_model_forward(tied, bias, packed):
    """DecodeStep re-lays out the float32 linears (column-major dense, or oneDNN-packed modules replacing the
    model's own): the model's forward, which prefill uses, gives the same logits after, on two different inputs
    in turn; a tied embedding keeps a dense table."""
    from serve import packed_linear

    if packed and not packed_linear.available():
        pytest.skip("this torch has no oneDNN packed linear")
    model = random_doge(seed=3, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)
    if bias:
        with torch.no_grad():
            for layer in model.model.layers:  # transformers initialises biases to zero
                for linear in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.up_proj):
                    linear.bias.normal_(0.0, 0.5)
    a, b = torch.tensor([distinct_prompt(30, seed=7)]), torch.tensor([distinct_prompt(12, seed=8)] * 2)
    with torch.inference_mode():
        before = model(a).logits, model(b).logits
    DecodeStep(model, packed=packed)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    embed = model.model.embed_tokens.weight
    assert embed.shape == (VOCAB, 64)
    if packed:
        assert isinstance(model.lm_head, packed_linear.PackedLinear) and embed.is_contiguous()
        assert all(isinstance(m, FusedPart) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj,
                                                       mlp.up_proj))
        assert isinstance(attn.o_proj, packed_linear.PackedLinear)
        assert isinstance(mlp.down_proj, packed_linear.PackedLinear)
    else:
        head = model.lm_head.weight
        assert head.shape == (VOCAB, 64) and head.stride() == (1, VOCAB)
        assert (embed is head) == tied
        assert attn.q_proj.weight.stride()[0] == 1 and mlp.gate_proj.weight.stride()[0] == 1  # views of fused W^T
        assert mlp.down_proj.weight.stride()[0] == 1 and attn.o_proj.weight.stride()[0] == 1
    with torch.inference_mode():
        after = model(a).logits, model(b).logits, model(a).logits
    for got, want in zip(after, before + before[:1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_linear_kinds_are_measured_per_shape_and_a_mix_decodes_what_generate_decodes():
    """Built without `packed`, the step times oneDNN-packed against dense float32 on each weight shape and keeps
    the faster (`linear_choice.py`); whatever mix that gives must decode exactly what generate decodes, so a
    forced mix of both kinds (each fused group, single linear and the LM head on its own kind) is checked too."""
    from serve import linear_choice, packed_linear

    if not packed_linear.available():
        pytest.skip("this torch has no oneDNN packed linear")
    model = random_doge(seed=5, intermediate_size=96)  # gate/up [192, 64] and o_proj [64, 64] differ from q/k/v
    prompt = distinct_prompt(24, seed=11)
    expected = greedy_generate(model, prompt, 12)

    measured = DecodeStep(copy.deepcopy(model), rows=(1, 4))
    qkv, gate_up, o, down, head = (4 * 16 + 2 * 2 * 16, 64), (192, 64), (64, 64), (64, 96), (VOCAB, 64)
    assert list(measured.kinds) == [qkv, gate_up, o, down, head]
    for shape, kind in measured.kinds.items():
        seconds = measured.kind_seconds[shape]  # {kind: [seconds at 1 row, at 4 rows]}
        assert set(seconds) == {"packed", "dense"} and all(len(t) == 2 and min(t) > 0 for t in seconds.values())
        best = [min(seconds["packed"][i], seconds["dense"][i]) for i in range(2)]
        slowdown = {k: sum(t / b for t, b in zip(ts, best)) for k, ts in seconds.items()}
        assert kind == min(slowdown, key=slowdown.__getitem__)
    described = linear_choice.describe(measured.kinds, torch.float32).split("; ")
    assert [d.split(" ", 1)[0] for d in described] == [f"[{o}x{i}]" for o, i in measured.kinds]

    kinds = {qkv: "packed", gate_up: "dense", o: "dense", down: "packed", head: "packed"}
    mixed = copy.deepcopy(model)
    step = DecodeStep(mixed, kinds=kinds)
    assert step.kinds == kinds and step.kind_seconds == {}
    attn, mlp = mixed.model.layers[0].self_attn, mixed.model.layers[0].mlp
    assert isinstance(attn.q_proj, FusedPart) and isinstance(attn.o_proj, torch.nn.Linear)
    assert mlp.gate_proj.weight.stride()[0] == 1  # a view of the dense fused [192, 64] weight, column-major
    assert isinstance(mlp.down_proj, packed_linear.PackedLinear)
    assert isinstance(mixed.lm_head, packed_linear.PackedLinear)
    for chosen_model, chosen in ((mixed, step), (measured.model, measured)):
        assert static_greedy(chosen_model, chosen, prompt, len(expected)) == expected
    with pytest.raises(ValueError, match="kinds=.*'fast'"):
        DecodeStep(copy.deepcopy(model), kinds={qkv: "fast"})


def test_int8_layers_kept_float_decode_what_generate_decodes():
    """`--quantize int8` keeps each layer's float32 weight until the kernel choice has measured it
    (kernel_choice.py); where a table says "float", fused or not, LM head included, the step is float32's: at 1 row
    here up to 32 rows (the 24-token prefill and each decode step) it must decode exactly what generate decodes;
    more rows run the int8 kernel."""
    from serve.quantize import ANY_ROWS, Int8Linear, available, quantize_linears

    if not available():
        pytest.skip("no int8 kernel runs on this CPU")
    model = random_doge(seed=6, intermediate_size=96)
    prompt = distinct_prompt(24, seed=12)
    expected = greedy_generate(model, prompt, 12)
    quantised = copy.deepcopy(model)
    quantize_linears(quantised, keep_float=True)
    step = DecodeStep(quantised)
    layers = [m for m in quantised.modules() if isinstance(m, Int8Linear)] + step.fused_layers(Int8Linear)
    assert isinstance(quantised.lm_head, Int8Linear) and len(step.fused_layers(Int8Linear)) == 2 * len(step.layers)
    for layer in layers:
        layer.set_table([(32, "float"), (ANY_ROWS, available()[0])])
        layer.drop_unused_float()
        assert layer.float_weight is not None and layer.kernel_for(33) == available()[0]
    assert static_greedy(quantised, step, prompt, len(expected)) == expected


def test_compiled_layers_decode_what_generate_decodes():
    """`compile=True` (compiled.py): inductor compiles the layers once for batch 1 and once for any larger batch,
    with every float weight frozen into a prepacked kernel of its own (oneDNN or MKL), no opaque call left. Greedy
    tokens must equal generate's with one row, then two, and after a row passes the DMA window (whose top-k runs
    the eager layers)."""
    from torch._inductor.utils import run_and_get_code

    from serve import packed_linear

    model = random_doge(seed=1, keep_window_size=40)
    prompts = [distinct_prompt(n, seed=i) for i, n in enumerate([5, 30])]
    new = 16  # 30 + 16 passes the window of 40
    expected = [greedy_generate(model, p, new) for p in prompts]
    qkv, gate_up, o, down, head = (4 * 16 + 2 * 2 * 16, 64), (256, 64), (64, 64), (64, 128), (VOCAB, 64)
    kinds = {qkv: "packed", gate_up: "dense", o: "dense", down: "packed", head: "packed"}
    if not packed_linear.available():
        kinds = {shape: "dense" for shape in kinds}
    step = DecodeStep(model, kinds=kinds, compile=True)
    eager_calls = []
    eager = step.layers_fn
    step.layers_fn = lambda *args: eager_calls.append(args[-1]) or eager(*args)
    batch = SlotBatch(step, slots=2, max_len=64)
    produced = []
    codes = []
    for i, prompt in enumerate(prompts):
        prefill, logits = KVBatch(model).prefill([prompt])
        batch.merge(prefill)
        produced.append([int(logits[0].argmax())])
        steps = new - 1 if i == 1 else 4  # the first row decodes alone for 4 steps, then beside the second
        for s in range(steps):
            live = [r for r, toks in enumerate(produced) if len(toks) < new]
            if s == 0:  # the first step of each batch size compiles its program: keep the C++ inductor wrote
                logits, code = run_and_get_code(batch.decode, [toks[-1] for toks in produced])
                codes += code
            else:
                logits = batch.decode([toks[-1] for toks in produced])
            for r in live:
                produced[r].append(int(logits[r].argmax()))
    assert [p[: new] for p in produced] == expected
    assert eager_calls and min(eager_calls) == 41  # only steps past the window ran eagerly
    assert len(codes) == 2  # batch 1, then any larger batch
    for code in codes:  # MKL's packed GEMM or inductor's micro-GEMM, whichever autotuning timed faster
        kernels = frozen_kernels(code)
        assert kernels & {"float32", "micro-gemm"} and "opaque" not in kernels, kernels


def frozen_kernels(code: str) -> set[str]:
    """What multiplies the weights in one compiled program (inductor's C++), which must hold them as constants
    (`_frozen_param`) and call no unpacked matmul: {"float32" (MKL's packed GEMM), "bfloat16" (oneDNN's packed
    linear), "int8" (`_weight_int8pack_mm`), "micro-gemm" (inductor's own, where its autotuning timed it faster),
    "opaque" (the custom op)}."""
    assert "_frozen_param" in code and "aoti_torch_cpu_mm" not in code and "addmm" not in code, code[:3000]
    found = {"float32": "_mkl_linear", "bfloat16": "_linear_pointwise", "int8": "_weight_int8pack_mm",
             "micro-gemm": "micro_gemm", "opaque": "doge_serve"}
    return {kind for kind, name in found.items() if name in code}


def _greedy_steps(model, step: DecodeStep, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list[str]]:
    """Both prompts decoded together for `new` greedy tokens; the C++ of every program compiled on the way."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    batch = SlotBatch(step, slots=len(prompts), max_len=64)
    prefill, logits = KVBatch(model).prefill(prompts)
    batch.merge(prefill)
    produced, codes = [[int(t)] for t in logits.argmax(-1)], []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):  # what run_and_get_code records
        for _ in range(new - 1):
            logits = batch.decode([toks[-1] for toks in produced])
            for r, row in enumerate(logits):
                produced[r].append(int(row.argmax()))
    return produced, codes


@pytest.mark.parametrize("kind", ["bfloat16", "bfloat16 cdmoe", "int8 w8a16", "int8 mixed",
                                  "int8 mixed cdmoe"])
def test_compiled_bf16_and_int8_layers_decode_what_the_eager_step_decodes(kind):
    """bfloat16 weights are frozen into oneDNN's packed bf16 kernel; an int8 layer whose measured table runs w8a16
    at every row count becomes inductor's weight-only int8 pattern, lowered to the same `_weight_int8pack_mm`; a
    table mixing kernels by rows keeps the opaque call (`doge_serve::linear`), which picks per call. Greedy tokens
    equal the eager step's on the same weights, two rows together; CDMoE too (its router's reductions once broke
    inductor's micro-GEMM epilogue fusion). An int8 CDMoE's router stays float32 (`quantize.KEEP_FLOAT`): as an
    int8 layer it was called through the model's module, which broke the graph, and dynamo then recompiled the
    pieces per thread count until its limit."""
    from serve import packed_linear
    from serve.quantize import Int8Linear, available, quantize_linears

    if kind.startswith("bfloat16") and not packed_linear.available(torch.bfloat16):
        pytest.skip("this torch has no oneDNN packed bf16 linear")
    if kind.startswith("int8") and "w8a16" not in available():
        pytest.skip("no w8a16 kernel here")
    moe = dict(is_moe=True, num_experts=64, num_experts_per_tok=4) if kind.endswith("cdmoe") else {}
    model = random_doge(seed=4, keep_window_size=40, **moe)
    if kind.startswith("int8"):
        quantize_linears(model, keep_float=True)  # "float" is a kernel too: the mixed table below runs it
    prompts = [distinct_prompt(12, seed=20), distinct_prompt(12, seed=21)]
    steps = []
    for compile in (False, True):
        twin = copy.deepcopy(model)
        bf16 = kind.startswith("bfloat16")
        step = DecodeStep(twin, dtype=torch.bfloat16 if bf16 else torch.float32, packed=True if bf16 else None,
                          compile=compile)
        table = [(1 << 30, "w8a16")] if kind == "int8 w8a16" else [(1, "w8a16"), (1 << 30, "float")]
        for layer in [m for m in twin.modules() if isinstance(m, Int8Linear)] + step.fused_layers(Int8Linear):
            layer.set_table(table)  # as the warm-up's measurement would, before the first (compiling) step
        steps.append(_greedy_steps(twin, step, prompts, 10))
    (eager, no_code), (compiled, codes) = steps
    assert no_code == [] and len(codes) == 1, len(codes)  # one program, for batch 2
    assert compiled == eager
    kernels = frozen_kernels(codes[0])  # at 2 rows: oneDNN or the micro-GEMM, whichever autotuning timed faster
    want = {"bfloat16": {"bfloat16", "micro-gemm"}, "bfloat16 cdmoe": {"bfloat16", "micro-gemm"},
            "int8 w8a16": {"int8", "micro-gemm"}, "int8 mixed": {"opaque"}, "int8 mixed cdmoe": {"opaque"}}
    assert kernels & want[kind] and ("opaque" in kernels) == kind.startswith("int8 mixed"), kernels


def test_compiling_the_same_layers_again_writes_the_same_cpp():
    """A restart compiles the same layers over new tensors. Inductor's C++ build cache is keyed by the source, so
    the source must not name the constants' addresses (`compiled.stable_cpp_source`): the second compile, over a
    copy of the model, writes byte for byte the first's C++, and g++ is not run again. Without the fix the two
    differ in one header comment per constant."""
    model = random_doge(seed=5, num_hidden_layers=1)
    prompts = [distinct_prompt(6, seed=30), distinct_prompt(6, seed=31)]
    sources = []
    for _ in range(2):
        twin = copy.deepcopy(model)
        step = DecodeStep(twin, dtype=torch.float32, compile=True)
        sources.append(_greedy_steps(twin, step, prompts, 3)[1])
    first, again = sources
    assert len(first) == 1 and "_frozen_param" in first[0]
    assert again == first


@pytest.mark.parametrize("rope", [None, {"rope_type": "dynamic", "factor": 4.0}, {"rope_type": "linear", "factor": 2.0}])
def test_rope_table_is_bitwise_the_rotary_modules_output(rope):
    """The step reads cos/sin below the original context from a table of the rotary module's own output: each entry
    equals what a call for that position returns, also after a long prompt grew dynamic NTK's frequencies (the
    module resets below the original context); at or past it the step calls the module."""
    overrides = {"max_position_embeddings": 64}
    if rope is not None:
        overrides["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    model = random_doge(3, **overrides)
    step = DecodeStep(model)
    rotary, H = model.model.rotary_emb, step.head_dim
    x = torch.randn(3, model.config.hidden_size)

    def module(positions):
        cos, sin = rotary(x, positions[:, None])
        return cos, torch.cat([-sin[..., : H // 2], sin[..., H // 2 :]], dim=-1)

    g = torch.Generator().manual_seed(0)
    for grow in (False, True):
        if grow:  # a prefill past the original context, as the model's forward would run it
            rotary(x[:1], torch.arange(200)[None])
        positions = torch.randint(0, 63, (3,), generator=g)
        got = step.rope(x, positions, int(positions.max()) + 1)
        want = module(positions)  # after the table lookup: the module's own bookkeeping, as transformers runs it
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (rope, grow)
    far = torch.tensor([5, 70, 100])  # past the original context: the module itself, grown frequencies
    got = step.rope(x, far, 101)
    assert all(torch.equal(a, b) for a, b in zip(got, module(far)))


def test_fused_parts_never_serve_a_stale_output():
    """A FusedPart slices the fused output computed for the same input tensor; asked twice, or for another
    tensor, or (outside inference mode) after the tensor changed in place, it computes again."""
    from serve import packed_linear

    if not packed_linear.available():
        pytest.skip("this torch has no oneDNN packed linear")
    rng = torch.get_rng_state()
    assert packed_linear.available.__wrapped__() and torch.equal(torch.get_rng_state(), rng)  # probe: own RNG
    torch.manual_seed(0)
    parent = torch.nn.Module()
    parent.p, parent.q = torch.nn.Linear(16, 8), torch.nn.Linear(16, 24, bias=False)
    with torch.no_grad():
        wp, bp, wq = parent.p.weight.clone(), parent.p.bias.clone(), parent.q.weight.clone()
        fused = fuse_in_place(parent, ["p", "q"], packed_linear.PackedLinear.fused([parent.p, parent.q]))
        ref_p, ref_q = (lambda x: x @ wp.t() + bp), (lambda x: x @ wq.t())
        x, y = torch.randn(3, 16), torch.randn(3, 16)
        close = lambda got, want: torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # noqa: E731
        close(parent.p(x), ref_p(x))
        close(parent.q(y), ref_q(y))  # another tensor: not x's output
        close(parent.q(x), ref_q(x))
        close(parent.q(x), ref_q(x))  # the same part again
        close(parent.p(x), ref_p(x))  # every part served: the memo is dropped
        close(parent.p(x), ref_p(x))  # a new round for x
        x.mul_(2.0)  # in place, same tensor object: its version counter moves
        close(parent.q(x), ref_q(x))
        close(fused(x), torch.cat([ref_p(x), ref_q(x)], dim=-1))


def test_engine_requests_join_and_leave_slots_and_match_generate(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = copy.deepcopy(model)  # the engine fuses weights in place; generate runs on an untouched copy
    engine = Engine(model, tokenizer, max_batch=3, max_queue=8, threads=1, dtype="float32")
    assert engine.decode_path == "static"
    lengths, budgets = [4, 31, 12, 7, 19, 2], [24, 6, 30, 10, 16, 12]
    prompts = [[5 + (7 * i + 13 * j) % 400 for j in range(n)] for i, n in enumerate(lengths)]

    async def tokens_of(handle) -> list[int]:
        ids = {}
        async for deltas in handle.deltas():
            for d in deltas:
                ids.setdefault(d.index, []).extend(lp.token_id for lp in d.logprobs)
        return ids[0]

    async def run():
        engine.start()
        handles = []
        for p, m in zip(prompts, budgets):  # more requests than slots: later ones wait for a slot to free up
            handles.append(engine.submit([p], RequestSampling(max_tokens=m, temperature=0.0, logprobs=0)))
            await asyncio.sleep(0.005)
        cancelled = engine.submit([prompts[0]], RequestSampling(max_tokens=400, temperature=0.0, ignore_eos=True))
        stream = cancelled.deltas()
        await stream.__anext__()
        cancelled.cancel()
        await stream.aclose()
        outputs = [await tokens_of(h) for h in handles]
        for _ in range(200):
            if engine.num_running == 0:
                break
            await asyncio.sleep(0.01)
        return outputs, cancelled

    try:
        outputs, cancelled = asyncio.run(run())
    finally:
        engine.stop()
    assert engine.peak_rows == 3 and cancelled.completion_tokens < 400
    assert engine._in_flight == 0 and engine._batch.rows == 0
    for p, m, got in zip(prompts, budgets, outputs):
        want = greedy_generate(reference, p, m)
        stops = [k for k, t in enumerate(want) if t in engine.eos_ids]
        want = want[: stops[0] + 1] if stops else want  # the engine stops at the first EOS, generate went on
        assert got == want, (p, got, want)


def test_server_warms_up_before_health_answers(tiny_model_dir, tmp_path):
    server = ServerProcess(tiny_model_dir, tmp_path / "server.log", "--log-level", "info", "--threads", "1",
                           "--quantize", "int8", "--max-batch", "4")
    try:
        deadline = time.monotonic() + 120
        healthy_at = None
        while time.monotonic() < deadline:
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    healthy_at = time.time()  # the first 200 has arrived by now
                    break
            except httpx.HTTPError:
                pass
            assert server.proc.poll() is None, server.log()
            time.sleep(0.05)
        assert healthy_at is not None, server.log()
        while "warm-up done in" not in server.log_path.read_text(errors="replace") and time.time() < healthy_at + 10:
            time.sleep(0.05)  # the app's log handler may write from a queue, after uvicorn's own lines
        log = server.log_path.read_text(errors="replace")
        assert "warming up the static decode path" in log and "int8 kernels by rows, measured in" in log, log
        # The warm-up finished before /health first answered: its record's time (asctime, truncated to the
        # millisecond, local time) is not after the first 200.
        stamp = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\D[^\n]*warm-up done in", log)
        assert stamp, log
        done_at = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1000
        assert done_at <= healthy_at, (done_at, healthy_at, log)
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny-doge", "prompt": "The parser",
                                                             "max_tokens": 5, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()


def test_compiled_step_does_not_recompile_when_the_cache_grows():
    """A row decoding from 250 to 269 keys passes 256 (the cache's first chunk) inside the DMA window: the
    compiled step keeps its one program (it once recompiled at S == capacity, a minute's stall in a server) and
    decodes what the eager step decodes."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    model = random_doge(seed=1, keep_window_size=600)
    prompt = distinct_prompt(250, seed=3)
    runs = []
    for compile in (False, True):
        twin = copy.deepcopy(model)
        batch = SlotBatch(DecodeStep(twin, compile=compile), slots=2, max_len=1024)
        codes, capacities = [], set()
        with mock.patch.object(GraphLowering, "save_output_code", codes.append):
            prefill, logits = KVBatch(twin).prefill([prompt])
            batch.merge(prefill)
            tokens = [int(logits[0].argmax())]
            for _ in range(19):
                tokens.append(int(batch.decode([tokens[-1]])[0].argmax()))
                capacities.add(batch.cache.capacity)
        runs.append((tokens, len(codes), capacities))
    (eager, _, _), (compiled, programs, capacities) = runs
    assert capacities == {CHUNK, 2 * CHUNK} and programs == 1 and compiled == eager, (capacities, programs)
