"""The server's linear kernels: bfloat16 packed weights, the two int8 kernels and their per-batch-size choice,
and the CPU facts that pick the default dtype. Each kernel is checked against the product of the weights it
holds, with the error bound its rounding allows; how far the whole model moves from float32 is
test_serve_quality.py's."""

from __future__ import annotations

import time
import types

import pytest
import torch
from transformers import DogeConfig, DogeForCausalLM

from serve import cpu, kernel_choice, packed_linear
from serve.decode_step import DecodeStep
from serve.engine import Engine, resolve_dtype
from serve.quantize import ANY_ROWS, INT8_KERNELS, Int8Linear, available, quantize_linears

from serve_fixtures import tiny_model_dir  # noqa: F401  (pytest fixture)

needs_bf16 = pytest.mark.skipif(not packed_linear.available(torch.bfloat16), reason="no oneDNN bfloat16 linear")
BF16_EPS = 2.0 ** -8  # bfloat16's relative rounding step (7 stored mantissa bits)


def linear(out_features: int, in_features: int, seed: int, bias: bool = True) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.05)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=g))
    return layer


@needs_bf16
def test_bfloat16_packed_linear_rounds_inputs_and_output_only():
    """y = bf16(bf16(x) @ bf16(W)^T + b), accumulated in float32, returned in the input's dtype."""
    g = torch.Generator().manual_seed(1)
    dense = linear(96, 256, seed=1)
    layer = packed_linear.PackedLinear.of(dense, torch.bfloat16)
    x = torch.randn(5, 256, generator=g) * 3
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (5, 96) and layer.packed.dtype == torch.bfloat16
    rounded = x.bfloat16().float() @ dense.weight.detach().bfloat16().float().T + dense.bias.detach().bfloat16().float()
    assert ((y - rounded).abs() <= rounded.abs() * BF16_EPS + 1e-6).all()  # only the output's own rounding
    exact = dense(x).detach()
    assert float((y - exact).abs().max()) > 1e-4  # it did run in bfloat16, not float32


@needs_bf16
def test_bfloat16_decode_step_keeps_norms_dt_and_cache_in_float32():
    torch.manual_seed(0)
    model = DogeForCausalLM(DogeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    step = DecodeStep(model, packed=True, dtype=torch.bfloat16)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert step.layers[0].qkv.dtype == torch.bfloat16 and step.layers[0].gate_up.dtype == torch.bfloat16
    assert attn.o_proj.dtype == mlp.down_proj.dtype == model.lm_head.dtype == torch.bfloat16
    assert type(attn.dt_proj) is torch.nn.Linear and attn.dt_proj.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the tied table keeps its float32 rows
    assert model.model.norm.weight.dtype == attn.q_norm.weight.dtype == torch.float32
    assert step.dtype == torch.float32  # activations and the KV cache
    with pytest.raises(ValueError, match="needs oneDNN's packed linear"):
        DecodeStep(DogeForCausalLM(model.config).eval(), packed=False, dtype=torch.bfloat16)


@needs_bf16
def test_float_weight_bytes_counts_what_a_step_reads_but_int8_layers():
    """What the int8 kernels' timing reads between samples besides their own bytes (kernel_choice.choose's
    other_bytes): every linear a step runs, at its stored dtype; int8 layers and the embedding table (read a row a
    token) are not counted."""
    torch.manual_seed(0)
    config = DogeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    D, F, L, V, N, K, H = 64, 128, 2, 128, 4, 2, 16
    linears = (N + 2 * K) * H * D + 2 * F * D + D * N * H + D * F  # q/k/v, gate/up, o, down: per layer
    dt = K * K * H  # dt_proj [K, K*H] (no bias: attention_bias=False), float32 always
    bf16 = DecodeStep(DogeForCausalLM(config).eval(), packed=True, dtype=torch.bfloat16)
    assert bf16.float_weight_bytes() == L * (2 * linears + 4 * dt) + 2 * V * D
    model = DogeForCausalLM(config).eval()
    quantize_linears(model)  # every linear int8 but dt_proj, the LM head included
    int8 = DecodeStep(model)
    assert int8.float_weight_bytes() == L * 4 * dt


def test_int8_weights_are_within_half_a_step():
    dense = linear(48, 64, seed=3)
    q = Int8Linear.from_linear(dense)
    assert q.qweight.dtype == torch.int8 and int(q.qweight.abs().max()) <= 127
    assert torch.equal(q.scales.bfloat16().float(), q.scales)  # bfloat16-exact: w8a16's scales lose nothing
    step = q.scales[:, None]
    assert ((q.dequantized() - dense.weight).abs() <= step / 2 + 1e-9).all()
    assert quantize_linears(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(32, 4))) == (1, ["0"])


@pytest.mark.parametrize("kernel, digits", [("w8a16", None), ("w8a8", 2), ("w8a8", 1)])
def test_int8_kernel_computes_the_dequantised_product(kernel, digits):
    """w8a16 rounds the activations and output to bfloat16; w8a8 holds each row of activations as two 8-bit
    digits over [-max|x|, max|x|] (a step of 2 max|x| / 255^2), so |dy_o| <= step / 2 * sum_i |W_oi| (one digit,
    a step 255 times as large, fails this); the LM head's one digit (`digits = 1`) meets that bound for its step."""
    if kernel not in available():
        pytest.skip(f"{kernel} does not run here (available: {available()})")
    g = torch.Generator().manual_seed(4)
    dense = linear(80, 256, seed=4)
    q = Int8Linear.from_linear(dense, table=[(ANY_ROWS, kernel)])
    q.digits = digits or q.digits
    x = torch.randn(7, 256, generator=g) * torch.logspace(-2, 2, 7)[:, None]  # rows of very different sizes
    y = q(x)
    w = q.dequantized()
    if kernel == "w8a16":
        ref = x.bfloat16().float() @ w.T
        bound = ref.abs() * BF16_EPS + (x.bfloat16().float() - x).abs() @ w.abs().T + 1e-5
    else:
        ref = x @ w.T
        step = 2 * x.abs().amax(-1, keepdim=True) / 255 ** digits  # [M, 1]
        bound = step / 2 * w.abs().sum(-1)[None, :] * 1.01 + ref.abs() * 2.0 ** -20 + 1e-5
    err = (y - dense.bias.detach() - ref).abs()
    assert (err <= bound).all(), float((err / bound).max())


def test_w8a8_rows_do_not_depend_on_the_rest_of_the_batch():
    """One fixed quantisation range per call (the +1/-1 columns): a row alone and in any batch is bit-identical."""
    if "w8a8" not in available():
        pytest.skip("w8a8 does not run here")
    g = torch.Generator().manual_seed(5)
    q = Int8Linear.from_linear(linear(64, 128, seed=5), table=[(ANY_ROWS, "w8a8")])
    x = torch.randn(16, 128, generator=g) * torch.logspace(-3, 3, 16)[:, None]
    x[3] = x[3].abs()  # a row with no negative entry: alone, its own range would not reach -1
    batch = q(x)
    for i in range(16):
        assert torch.equal(q(x[i : i + 1])[0], batch[i]), i


def test_int8_table_picks_the_kernel_by_row_count():
    if len(available()) < 2:
        pytest.skip(f"one int8 kernel here: {available()}")
    q = Int8Linear.from_linear(linear(32, 64, seed=6), table=[(2, "w8a16"), (ANY_ROWS, "w8a8")])
    assert [q.kernel_for(m) for m in (1, 2, 3, 500)] == ["w8a16", "w8a16", "w8a8", "w8a8"]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(q(x[:2]), q.run(x[:2], "w8a16") + q.bias) and torch.equal(q(x), q.run(x, "w8a8") + q.bias)
    with pytest.raises(ValueError, match="kernel='fp8' must be one of"):
        q.set_table([(ANY_ROWS, "fp8")])


def test_kernel_choice_gives_every_layer_of_a_shape_one_table():
    layers = [Int8Linear.from_linear(linear(o, 64, seed=i)) for i, o in enumerate((96, 96, 512))]
    tables = kernel_choice.choose(layers, max_rows=6, repeats=1)
    assert kernel_choice.row_counts(6) == [1, 2, 4, 6] and set(tables) == {(96, 64), (512, 64)}
    for layer in layers:
        table = tables[layer.out_features, layer.in_features]
        assert layer.table == table and table[-1][0] == ANY_ROWS
        assert all(kernel in available() for _, kernel in table)
        assert [r for r, _ in table] == sorted(r for r, _ in table)
    assert "[96x64]" in kernel_choice.describe(tables)


def test_float_kernel_is_the_kept_float_product_until_a_table_drops_it():
    dense = linear(96, 64, seed=7)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(7))
    q = Int8Linear.from_linear(dense, table=[(2, "float"), (ANY_ROWS, available()[0])], keep_float=True)
    assert q.float_weight.stride() == (1, 96)  # column-major: MKL's GEMM at small batches (layout.py)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, dense.weight, dense.bias)
        assert torch.allclose(q(x[:2]), ref[:2], rtol=1e-6, atol=1e-6)  # float32 both, only the summation order
        assert not torch.equal(q(x), ref)  # 5 rows: the int8 kernel
        halves = Int8Linear.concat([q, Int8Linear.from_linear(linear(32, 64, seed=8), keep_float=True)])
        assert torch.equal(halves.float_weight[:96], dense.weight.detach())
        q.drop_unused_float()
        assert q.float_weight is not None  # its table still uses it
        q.set_table([(ANY_ROWS, available()[0])])
        q.drop_unused_float()
    assert q.float_weight is None  # no row count uses it: its bytes go
    with pytest.raises(ValueError, match="kernel='float' needs the layer's float weight"):
        q.set_table([(ANY_ROWS, "float")])
    with pytest.raises(ValueError, match="kernel='float' needs"):
        Int8Linear.from_linear(dense, table=[(ANY_ROWS, "float")])


def test_kernel_choice_measures_the_kept_float_weight_beside_int8(monkeypatch):
    """"float" is a candidate where every layer of a shape kept its float weight, and wins where it is timed
    fastest: here the int8 kernels are made slow, so every table is float; without float weights it is int8."""
    layers = [Int8Linear.from_linear(linear(o, 64, seed=i), keep_float=True) for i, o in enumerate((96, 96, 512))]
    mixed = Int8Linear.from_linear(linear(40, 64, seed=9), keep_float=True)
    plain = Int8Linear.from_linear(linear(40, 64, seed=10))  # no float weight: the 40x64 group stays int8
    run = Int8Linear.run

    def slow_int8(self, x, kernel):
        if kernel != "float":
            time.sleep(0.02)  # far above any float sample, also on a loaded box
        return run(self, x, kernel)

    monkeypatch.setattr(Int8Linear, "run", slow_int8)
    tables = kernel_choice.choose([*layers, mixed, plain], max_rows=4, repeats=1)
    assert tables[96, 64] == tables[512, 64] == [(ANY_ROWS, "float")]
    assert all(k in available() for _, k in tables[40, 64]) and mixed.float_weight is None
    assert all(layer.float_weight is not None for layer in layers)
    assert "[96x64] more float" in kernel_choice.describe(tables)


def test_w8a8_is_chosen_only_where_it_beats_w8a16_by_the_margin():
    """w8a8 rounds activations to 8 bits: within `W8A8_MARGIN` of w8a16 the more accurate w8a16 runs."""
    m = kernel_choice.W8A8_MARGIN
    assert kernel_choice.pick({"w8a16": 1.0, "w8a8": 1.0 / (1 + m / 2)}) == "w8a16"
    assert kernel_choice.pick({"w8a16": 1.0, "w8a8": 1.0 / (1 + 2 * m)}) == "w8a8"
    assert kernel_choice.pick({"w8a16": 1.0, "w8a8": 2.0}) == "w8a16"
    assert kernel_choice.pick({"w8a8": 1.0}) == "w8a8"  # no w8a16 to prefer
    assert kernel_choice.pick({"float": 0.99, "w8a16": 1.0, "w8a8": 0.995}) == "float"  # float: by time alone
    assert kernel_choice.pick({"float": 1.2, "w8a16": 1.05, "w8a8": 1.0}) == "w8a16"


@pytest.mark.skipif("w8a8" not in available() or "w8a16" not in available(), reason="needs both int8 kernels")
@pytest.mark.parametrize("w8a16_ms, expected", [(20.6, "w8a16"), (30.0, "w8a8")])
def test_kernel_choice_keeps_w8a16_unless_w8a8_is_clearly_faster(monkeypatch, w8a16_ms, expected):
    """Through `choose`, on a virtual clock that only the kernels move: each sample of the group takes 20 ms on
    w8a8 and 20.6 ms (3 % slower: w8a16 kept) or 30 ms (50 % slower: w8a8 chosen) on w8a16. (Sleeps instead of
    the virtual clock flipped the 3 % case once in CI, on a loaded box.)"""
    layers = [Int8Linear.from_linear(linear(96, 64, seed=i)) for i in range(2)]
    run = Int8Linear.run
    now = [0.0]

    def timed(self, x, kernel):
        now[0] += (w8a16_ms / 2 if kernel == "w8a16" else 10.0) / 1e3  # per layer: the group of 2 sums them
        return run(self, x, kernel)

    monkeypatch.setattr(Int8Linear, "run", timed)
    monkeypatch.setattr(kernel_choice, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    tables = kernel_choice.choose(layers, max_rows=2, repeats=3)
    assert tables[96, 64] == [(ANY_ROWS, expected)]


def test_the_flush_between_samples_reads_at_most_twice_the_last_level_cache():
    cache = cpu.last_level_cache_bytes()
    assert cache is None or cache >= 2**16  # sysfs's biggest cache: the last level, at least 64 KiB on any CPU
    cap = kernel_choice.flush_cap()
    assert cap == (kernel_choice.FLUSH_CAP if cache is None else min(kernel_choice.FLUSH_CAP, 2 * cache))
    assert kernel_choice.flush_buffer(1000).numel() == 250
    assert kernel_choice.flush_buffer(10 * 2**30).numel() == cap // 4


def test_cpu_facts_name_the_flags_and_pick_the_dtype():
    flags = cpu.flags()
    line = cpu.describe()
    assert f"{cpu.cores()} cores" in line and all(f in line for f in cpu.KERNEL_FLAGS if f in flags)
    if flags & {"avx512_bf16", "amx_bf16"} and packed_linear.available(torch.bfloat16):
        assert cpu.default_dtype() == "bfloat16" and resolve_dtype("auto") == torch.bfloat16
    if not cpu.native_bf16():
        assert cpu.default_dtype() == "float32"
    with pytest.raises(ValueError, match=r"dtype='float16' must be one of \('auto', 'float32', 'bfloat16'\)"):
        resolve_dtype("float16")


@needs_bf16
def test_dynamic_path_in_bfloat16_packs_the_projections_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), max_batch=2, threads=1,
                    decode_path="dynamic", dtype="bfloat16")
    assert engine.decode_path == "dynamic" and engine.dtype == torch.bfloat16
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, packed_linear.PackedLinear) and attn.q_proj.dtype == torch.bfloat16
    # the head: int8 with float32 leaders where an int8 kernel runs (quantize_head), else packed bf16
    assert isinstance(model.lm_head, Int8Linear if available() else packed_linear.PackedLinear)
    assert type(attn.dt_proj) is torch.nn.Linear  # float32: it picks DMA's top-k keys
    with pytest.raises(ValueError, match="load the model in float32"):
        Engine(model.to(torch.bfloat16), engine.tokenizer)
