"""One GPU check of the DMA kernel and the training stack, under 8 minutes on an H100/H200.

    python benchmarks/gpu_check_dma.py --out DIR              # on a GPU
    python benchmarks/gpu_check_dma.py --out DIR --dry-run    # the whole script on CPU: tiny shapes, interpret mode

Steps, in order; DIR/gpu_check_dma.json and DIR/gpu_check_dma.md are rewritten after every row, so a timeout
still leaves what was measured, and a step that fails is recorded and the next one runs:
1. correctness: the Triton kernel's output and q/k/v/dt gradients vs the XLA reference at T = 2k and 8k, fp32 and
   bf16, GQA 2 and 4, the top-k window active (keep_window_size < T; at 8k the sparse key walk), padding /
   segments / one bias per query head. fp32: full-precision matmuls on both sides, |Δout| ≤ 1e-4 and
   |Δgrad| ≤ 1e-3·max(1, max|grad|). bf16: judged against the fp32 reference of the same inputs, allowed 2× the
   bf16 reference's own error + 1e-2·max(1, max|grad|).
2. kernel time: fwd and fwd+bwd of the kernel, the XLA reference and cuDNN (`jax.nn.dot_product_attention(
   implementation="cudnn")` with the DMA bias materialised as [B, N, T, S] outside the timed region) at
   T = 2k/8k/16k, keep_window_size 2048, bf16 (benchmarks/bench_dma.py's table).
3. train step: doge_20m, doge_160m and doge_40m_moe, bf16, one GPU, the trainer's jitted step (AdamW, donated
   state) with attention_impl "auto" and "xla": tokens/s, MFU against a bf16 matmul rate measured here (and
   against the datasheet peak of doge_jax.trainer.flops when it knows the device), and memory: the compiled
   step's temp + argument bytes (memory_analysis) and the device's peak bytes in use so far.
4. decode: doge_jax.sampler (greedy, bf16 weights) for doge_20m and doge_160m at batch 1 and 16: decode tok/s
   (prefill excluded: the time of N tokens minus the time of 1), random weights with A ≠ 0.
--dry-run runs every step on CPU with tiny shapes (kernels in interpret mode; "auto" is replaced by "pallas_gpu"
so the kernel path runs, since on CPU "auto" means the reference): it checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_dma  # noqa: E402
import bench_train  # noqa: E402
from doge_jax.kernels.gpu_dma import dma_pallas_gpu  # noqa: E402
from doge_jax.model.dma_reference import dma_reference  # noqa: E402
from doge_jax.model.mask import MaskSpec  # noqa: E402

# name, shapes, mask: T = 2k and 8k, fp32 and bf16, GQA 2 (N/K = 4/2) and 4 (8/2), the top-k always active.
CASES = [
    ("fp32_gqa2_T2k_leftpad", dict(B=2, T=2048, N=4, K=2, H=128, G=2, dtype="float32"),
     dict(keep_window_size=512, left_pad=(0, 77))),
    ("bf16_gqa4_T2k_bias_per_head_segments", dict(B=1, T=2048, N=8, K=2, H=128, G=8, dtype="bfloat16"),
     dict(keep_window_size=512, segments=(700, 1500))),
    ("fp32_gqa4_T8k_sparse", dict(B=1, T=8192, N=8, K=2, H=64, G=2, dtype="float32"),
     dict(keep_window_size=2048)),
    ("bf16_gqa2_T8k_sparse_leftpad", dict(B=1, T=8192, N=4, K=2, H=128, G=2, dtype="bfloat16"),
     dict(keep_window_size=2048, left_pad=(300,))),
]
DRY_CASES = [
    ("fp32_gqa2_leftpad", dict(B=2, T=96, N=4, K=2, H=16, G=2, dtype="float32"),
     dict(keep_window_size=32, left_pad=(0, 7))),
    ("bf16_gqa4_bias_per_head_segments", dict(B=1, T=64, N=8, K=2, H=16, G=8, dtype="bfloat16"),
     dict(keep_window_size=16, segments=(20, 40))),
]
TRAIN_PRESETS = ("doge_20m", "doge_160m", "doge_40m_moe")
DECODE_PRESETS = ("doge_20m", "doge_160m")
DRY_TRAIN_PRESETS = ("doge_20m", "doge_40m_moe")  # a dense and a MoE preset: every code path, fewer compiles
DRY_DECODE_PRESETS = ("doge_20m",)


# --- 1. correctness ---------------------------------------------------------------------------------------------

def _mask(B, T, extra) -> MaskSpec:
    kw = {"keep_window_size": extra["keep_window_size"]}
    if "left_pad" in extra:
        kw["kv_mask"] = jnp.arange(T)[None, :] >= jnp.asarray(extra["left_pad"])[:, None]
    if "segments" in extra:
        seg = jnp.ones((B, T), jnp.int32)
        for start in extra["segments"]:
            seg = seg + (jnp.arange(T) >= start)
        kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    return MaskSpec(**kw)


def _vjp(fn, args, do):
    """[out, dq, dk, dv, ddt] of fn at args with output cotangent do, in one jitted call."""

    def both(args, do):
        out, pull = jax.vjp(fn, *args)
        return [out, *pull(do)]

    return jax.jit(both)(list(args), do)


def check_case(name, shapes, extra) -> dict:
    shapes = dict(shapes)
    dtype = jnp.dtype(shapes.pop("dtype"))
    args, do = bench_dma.make_inputs(0, dtype=dtype, **shapes)
    mask, scale = _mask(shapes["B"], shapes["T"], extra), shapes["H"] ** -0.5
    got = _vjp(lambda *a: dma_pallas_gpu(*a, mask, scale=scale), args, do)
    reference = lambda *a: dma_reference(*a, mask, scale=scale)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = _vjp(reference, [a.astype(jnp.float32) for a in args], do.astype(jnp.float32))
        ref_low = _vjp(reference, args, do) if dtype != jnp.float32 else None
    result = {"case": name, **shapes, "dtype": str(dtype), **{k: list(v) if isinstance(v, tuple) else v
                                                                for k, v in extra.items()}, "ok": True, "errors": {}}
    for i, n in enumerate(["out", "dq", "dk", "dv", "ddt"]):
        g, w = np.asarray(got[i], np.float32), np.asarray(want[i], np.float32)
        size = max(1.0, float(np.max(np.abs(w))))
        err = float(np.max(np.abs(g - w)))
        if ref_low is None:
            limit = 1e-4 if n == "out" else 1e-3 * size
        else:
            limit = 2 * float(np.max(np.abs(np.asarray(ref_low[i], np.float32) - w))) + 1e-2 * size
        result["errors"][n] = {"max_abs": err, "limit": limit}
        result["ok"] &= bool(np.isfinite(err) and err <= limit)
    return result


# --- 3. train step ----------------------------------------------------------------------------------------------

def matmul_peak(n: int, dtype=jnp.bfloat16, seconds: float = 1.0) -> float:
    """The best FLOP/s of n×n×n matmuls in `dtype` over `seconds` (what "100 % MFU" means in this script)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def tiny(config):
    """The dry run's stand-in for a preset: its architecture options, at a size a CPU compiles in seconds."""
    m = config.model
    m.num_hidden_layers, m.hidden_size, m.intermediate_size = 1, 64, 128
    m.num_attention_heads, m.num_key_value_heads, m.vocab_size = 4, 2, 512
    m.keep_window_size, m.max_position_embeddings = 32, 128
    if m.is_moe:
        m.num_experts, m.num_experts_per_tok = 64, 4
    return config


def train_row(preset, impl, *, batch, seq_len, steps, dry, peak_measured) -> dict:
    from doge_jax.trainer import flops

    config = bench_train._config(preset, batch, seq_len, "bfloat16")
    if dry:
        tiny(config)
    run_impl = "pallas_gpu" if (dry and impl == "auto") else impl
    config.model.attention_impl = run_impl
    row = {"preset": preset, "attention_impl": impl, "ran": run_impl, "batch": batch, "seq_len": seq_len}
    t0 = time.perf_counter()
    side = bench_train.JaxSide(config)
    compiled = side.step.lower(side.state, side.batch).compile()
    side.step = compiled  # the executable measured below is the one memory_analysis describes
    side.run(1)
    row["compile_s"] = time.perf_counter() - t0
    rates = [side.run(steps) for _ in range(3)]
    rate = statistics.median(rates)
    fpt = flops.flops_per_token(side.cfg, seq_len)
    mem = compiled.memory_analysis()
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak_table = flops.peak_flops(device, "bfloat16") if device.platform != "cpu" else None
    row.update(tokens_per_s=rate, tflops=rate * fpt / 1e12, mfu_measured=rate * fpt / peak_measured,
               mfu_datasheet=rate * fpt / peak_table if peak_table else None,
               step_temp_gib=getattr(mem, "temp_size_in_bytes", 0) / 2**30,
               step_args_gib=getattr(mem, "argument_size_in_bytes", 0) / 2**30,
               device_peak_gib=stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None)
    del side, compiled
    return row


# --- 4. decode --------------------------------------------------------------------------------------------------

def decode_row(preset, batch, *, prompt_len, new_tokens, dry) -> dict:
    from doge_jax.model import decoder as model_lib
    from doge_jax.sampler import Sampler, SamplingParams
    from doge_jax.trainer import validate

    config = bench_train._config(preset, batch, 128, "float32")
    if dry:
        tiny(config)
    cfg = validate.model_config(config.model)
    model = model_lib.build(cfg, seed=0)
    for i, layer in enumerate(model.layers):  # A ≠ 0: dt varies across keys, as in a trained model
        layer.self_attn.A[...] = 0.5 * jax.random.normal(jax.random.key(i), layer.self_attn.A[...].shape)
    sampler = Sampler(model, pad_id=0, dtype="bfloat16")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]

    def run(n):
        t0 = time.perf_counter()
        sampler(prompts, SamplingParams(max_new_tokens=n))
        return time.perf_counter() - t0

    run(new_tokens), run(1)  # compile both lengths
    full = min(run(new_tokens) for _ in range(3))
    prefill = min(run(1) for _ in range(3))
    return {"preset": preset, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "decode_tok_s": batch * (new_tokens - 1) / max(full - prefill, 1e-9),
            "end_to_end_tok_s": batch * new_tokens / full}


# --- the report -------------------------------------------------------------------------------------------------

def markdown(report) -> str:
    env = report["environment"]
    out = [f"# gpu_check_dma ({'DRY RUN on CPU: checks the script, not the numbers' if report['dry_run'] else 'GPU'})",
           "", f"jax {env['jax']}, backend {env['backend']}, device {env['device']}; "
           f"{report.get('seconds', 0):.0f} s so far", "", "## 1. correctness (kernel vs XLA reference)", "",
           "| case | ok | out | dq | dk | dv | ddt |", "|---|---|---|---|---|---|---|"]
    for r in report["correctness"]:
        cells = [f"{e['max_abs']:.1e} / {e['limit']:.1e}" for e in r.get("errors", {}).values()]
        out.append(f"| {r['case']} | {'PASS' if r['ok'] else 'FAIL ' + r.get('exception', '')[:120]} | "
                   + " | ".join(cells or [""] * 5) + " |")
    shape = report.get("kernel_time_shape", {})
    out += ["", f"## 2. kernel time (bf16, {', '.join(f'{k}={v}' for k, v in shape.items())})", "",
            "| T | impl | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s | note |", "|---|---|---|---|---|---|---|"]
    for r in report["kernel_time"]:
        cell = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        out.append(f"| {r['T']} | {r['impl']} | {cell('fwd_ms')} | {cell('fwd_tflops')} | {cell('fwd+bwd_ms')} | "
                   f"{cell('fwd+bwd_tflops')} | {r.get('error', '')} |")
    out += [""] + [f"- {line}" for line in report.get("speedups", [])]
    peak = report.get("matmul_peak_tflops")
    out += ["", f"## 3. train step (bf16, one device; MFU vs a measured bf16 matmul rate of "
            f"{peak:.1f} TFLOP/s)" if peak else "## 3. train step", "",
            "| preset | attention_impl | ran | batch×seq | tokens/s | TFLOP/s | MFU (measured peak) | "
            "MFU (datasheet) | step temp GiB | args GiB | device peak GiB | note |", "|---" * 12 + "|"]
    for r in report["train"]:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "-")  # noqa: E731
        out.append(f"| {r['preset']} | {r['attention_impl']} | {r.get('ran', '')} | {r['batch']}×{r['seq_len']} | "
                   f"{f('tokens_per_s', '{:,.0f}')} | {f('tflops', '{:.1f}')} | {f('mfu_measured', '{:.1%}')} | "
                   f"{f('mfu_datasheet', '{:.1%}')} | {f('step_temp_gib', '{:.2f}')} | "
                   f"{f('step_args_gib', '{:.2f}')} | {f('device_peak_gib', '{:.2f}')} | {r.get('error', '')[:120]} |")
    out += ["", "## 4. decode (doge_jax.sampler, greedy, bf16)", "",
            "| preset | batch | decode tok/s | end-to-end tok/s | note |", "|---|---|---|---|---|"]
    for r in report["decode"]:
        f = lambda k: f"{r[k]:,.1f}" if k in r else "-"  # noqa: E731
        out.append(f"| {r['preset']} | {r['batch']} | {f('decode_tok_s')} | {f('end_to_end_tok_s')} | "
                   f"{r.get('error', '')[:120]} |")
    return "\n".join(out) + "\n"


class Report:
    """The JSON + markdown pair under DIR, rewritten after every row."""

    def __init__(self, out_dir: str, dry: bool):
        self.dir, self.t0 = out_dir, time.perf_counter()
        self.data = {"environment": bench_dma.environment(), "dry_run": dry, "correctness": [], "kernel_time": [],
                     "train": [], "decode": []}

    def save(self):
        self.data["seconds"] = time.perf_counter() - self.t0
        bench_dma.write_json(os.path.join(self.dir, "gpu_check_dma.json"), self.data)
        path = os.path.join(self.dir, "gpu_check_dma.md")
        with open(path + ".tmp", "w") as f:
            f.write(markdown(self.data))
        os.replace(path + ".tmp", path)

    def add(self, section: str, row: dict):
        self.data[section].append(row)
        self.save()


def guarded(fn, base: dict, *, over_budget: bool) -> dict:
    """fn() → its row; a failure or the time budget becomes the row's `error`, and the script goes on."""
    if over_budget:
        return {**base, "error": "skipped: over --budget-s"}
    t0 = time.perf_counter()
    try:
        row = fn()
    except Exception as e:  # noqa: BLE001 (OOM, a lowering error: recorded, the next row runs)
        row = {**base, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
               "traceback": traceback.format_exc()[-3000:]}
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpret mode: checks the script")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new row after this many seconds (default 420; the dry run: no limit)")
    a = p.parse_args(argv)
    dry = a.dry_run
    a.budget_s = a.budget_s if a.budget_s is not None else (1e9 if dry else 420.0)
    report = Report(a.out, dry)
    over = lambda: time.perf_counter() - report.t0 > a.budget_s  # noqa: E731
    print(report.data["environment"], flush=True)

    for name, shapes, extra in (DRY_CASES if dry else CASES):
        row = guarded(lambda: check_case(name, shapes, extra), {"case": name}, over_budget=over())
        row.setdefault("exception", row.get("error", ""))
        report.add("correctness", row)
        errs = " ".join(f"{k}={v['max_abs']:.1e}/{v['limit']:.1e}" for k, v in row.get("errors", {}).items())
        print(f"{'PASS' if row.get('ok') else 'FAIL'} {name} ({row['seconds']:.0f}s) {errs} {row['exception']}",
              flush=True)

    lengths, shape, window = ([96], dict(B=1, N=4, K=2, H=16, G=2), 32) if dry else \
        ([2048, 8192, 16384], dict(B=1, N=8, K=2, H=128, G=2), 2048)
    report.data["kernel_time_shape"] = {**shape, "keep_window_size": window}
    try:
        report.data["kernel_time"] = bench_dma.run_table(
            lengths, **shape, window=window, dtype=jnp.bfloat16, iters=1 if dry else 5, ref_max_len=16384,
            budget_s=a.budget_s, out="", meta={}, t_start=report.t0)
    except Exception as e:  # noqa: BLE001
        report.data["kernel_time"] = [{"T": 0, "impl": "-", "error": f"{type(e).__name__}: {e}"[:300]}]
    report.data["speedups"] = bench_dma.speedups(report.data["kernel_time"])
    report.save()
    print("\n".join(report.data["speedups"]), flush=True)

    peak = matmul_peak(256 if dry else 8192, seconds=0.2 if dry else 1.0)
    report.data["matmul_peak_tflops"] = peak / 1e12
    batch, seq_len, steps = (2, 64, 1) if dry else (16, 2048, 5)
    for preset in (DRY_TRAIN_PRESETS if dry else TRAIN_PRESETS):
        for impl in ("auto", "xla"):
            base = {"preset": preset, "attention_impl": impl, "batch": batch, "seq_len": seq_len}
            row = guarded(lambda: train_row(preset, impl, batch=batch, seq_len=seq_len, steps=steps, dry=dry,
                                            peak_measured=peak), base, over_budget=over())
            report.add("train", row)
            print(f"train {preset} {impl}: {row.get('tokens_per_s', 0):,.0f} tok/s, MFU "
                  f"{row.get('mfu_measured', 0):.1%} {row.get('error', '')}", flush=True)

    prompt_len, new_tokens = (8, 4) if dry else (32, 128)
    for preset in (DRY_DECODE_PRESETS if dry else DECODE_PRESETS):
        for batch in (1, 16):
            row = guarded(lambda: decode_row(preset, batch, prompt_len=prompt_len, new_tokens=new_tokens, dry=dry),
                          {"preset": preset, "batch": batch}, over_budget=over())
            report.add("decode", row)
            print(f"decode {preset} batch {batch}: {row.get('decode_tok_s', 0):,.1f} tok/s {row.get('error', '')}",
                  flush=True)

    failed = [r["case"] for r in report.data["correctness"] if not r.get("ok")]
    errors = [f"{s}: {r.get('preset', r.get('impl'))}" for s in ("kernel_time", "train", "decode")
              for r in report.data[s] if r.get("error") and not r["error"].startswith("skipped")]
    print(f"correctness: {'all pass' if not failed else 'FAIL ' + ', '.join(failed)}; errors: {errors or 'none'}; "
          f"{time.perf_counter() - report.t0:.0f}s; wrote {a.out}/gpu_check_dma.json and .md", flush=True)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
