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
import dataclasses
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
from doge_jax.kernels import gpu_tiles  # noqa: E402
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
TRAIN_BATCH = {"doge_20m": 64, "doge_160m": 32, "doge_40m_moe": 32}  # sequences of 2048: enough to fill an H200
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


def train_row(preset, impl, *, batch, seq_len, steps, dry, peak_measured, profile=None, num_micro=1) -> dict:
    """num_micro: micro-batches of the step, or "auto": doge_jax.trainer.fit's choice for this device."""
    from doge_jax.trainer import fit, flops

    config = bench_train._config(preset, batch, seq_len, "bfloat16")
    if dry:
        tiny(config)
    run_impl = "pallas_gpu" if (dry and impl == "auto") else impl
    config.model.attention_impl = run_impl
    row = {"preset": preset, "attention_impl": impl, "ran": run_impl, "batch": batch, "seq_len": seq_len}
    t0 = time.perf_counter()
    side = bench_train.JaxSide(config)
    if num_micro == "auto":
        memory = fit.device_memory(jax.devices())
        choice = fit.choose(side.compile_at, batch_size=batch, row_multiple=1, memory=memory, data_parallel=1)
        num_micro, compiled = choice.num_micro, choice.compiled
        row.update(fit="auto", usable_gib=memory.usable / 2**30,
                   fit_peaks_gib={str(a): p / 2**30 for a, p in sorted(choice.measured.items())})
    else:
        compiled = side.compile_at(num_micro)
    side.use(num_micro, compiled)  # the executable measured below is the one memory_analysis describes
    row["num_micro"] = num_micro
    side.run(1)
    row["compile_s"] = time.perf_counter() - t0
    rates = [side.run(steps) for _ in range(3)]
    rate = statistics.median(rates)
    if profile is not None:
        try:
            profile.append({"what": f"{preset} {impl} train step x{steps}, batch {batch}x{seq_len}",
                            **device_time_by_kernel(lambda: side.run(steps))})
        except Exception as e:  # noqa: BLE001 (the profile is a bonus: the row stands without it)
            profile.append({"what": f"{preset} {impl}", "error": f"{type(e).__name__}: {e}"})
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



# --- 5. tiles -----------------------------------------------------------------------------------------------------

# (rows, block_k, num_warps, num_stages); a tile holds rows = block_q·R query rows (R query heads per kv head).
# The first is today's default (64 rows × 64 keys, 8 warps at head dim 128).
TILES = [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 2), (64, 128, 8, 2), (128, 128, 8, 2),
         (64, 32, 4, 2), (128, 32, 4, 3), (64, 64, 4, 3)]
DRY_TILES = [(16, 16, 4, 2), (32, 16, 4, 2)]
# Every preset has head dim 128 and R = 2; "train" is doge_160m's attention at T = 2k (top-k inactive: T ≤ w),
# "long" the kernel table's 16k shape (R = 4, the sparse walk).
TILE_SHAPES = {"train": (2048, dict(B=16, N=6, K=3, H=128, G=3), 2048),
               "long": (16384, dict(B=1, N=8, K=2, H=128, G=2), 2048)}
DRY_TILE_SHAPES = {"dry": (96, dict(B=1, N=4, K=2, H=16, G=2), 32)}
KERNELS = ("dma_forward", "dma_backward_dq", "dma_backward_dkv")


def tile_row(T, tiles, *, shape, window, iters) -> dict:
    rows, block_k, warps, stages = tiles
    block_q = rows // (shape["N"] // shape["K"])
    args, do = bench_dma.make_inputs(T, T=T, dtype=jnp.bfloat16, **shape)
    scale = shape["H"] ** -0.5

    def fn(q, k, v, dt):
        return dma_pallas_gpu(q, k, v, dt, MaskSpec(keep_window_size=window), scale=scale, block_q=block_q,
                              block_k=block_k, num_warps=warps, num_stages=stages)

    compiled = bench_dma.compile_modes(fn, args, (), do)
    row = {"T": T, "block_q": block_q, "rows": block_q * shape["N"] // shape["K"], "block_k": block_k,
           "num_warps": warps, "num_stages": stages}
    for mode, call_args in (("fwd", args), ("fwd+bwd", (*args, do))):
        row[f"{mode}_ms"] = bench_dma.time_ms(compiled[mode], call_args, iters=iters)
    if jax.default_backend() == "gpu":  # each kernel's own time: the three may want different tiles
        reps = 5
        prof = device_time_by_kernel(lambda: [jax.block_until_ready(compiled["fwd+bwd"](*args, do))
                                              for _ in range(reps)])
        for k in prof["kernels"]:
            if k["name"] in KERNELS:
                row[f"{k['name']}_ms"] = k["ms"] / reps
    return row


# --- 6. profile ---------------------------------------------------------------------------------------------------

def device_time_by_kernel(run, top: int = 25) -> dict:
    """Runs run() under jax.profiler and sums the device's events by name: where a step's GPU time goes."""
    import glob
    import tempfile
    from collections import defaultdict

    from jax.profiler import ProfileData

    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir)
    wall0 = time.perf_counter()
    run()
    wall = time.perf_counter() - wall0
    jax.profiler.stop_trace()
    total, count, lines = defaultdict(float), defaultdict(int), set()
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                lines.add(f"{plane.name}/{line.name}")
                if "stream" not in line.name.lower() and plane.name.startswith("/device:GPU"):
                    continue  # the GPU plane's other lines (XLA ops, modules) repeat the kernels' time
                for ev in line.events:
                    total[ev.name] += ev.duration_ns / 1e6
                    count[ev.name] += 1
    busy = sum(total.values())
    rows = sorted(total, key=total.get, reverse=True)[:top]
    return {"wall_ms": 1e3 * wall, "device_busy_ms": busy, "lines": sorted(lines)[:40],
            "kernels": [{"name": n[:160], "ms": total[n], "calls": count[n], "share": total[n] / max(busy, 1e-9)}
                        for n in rows]}


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
            "| preset | attention_impl | ran | batch×seq | micro-batches | tokens/s | TFLOP/s | MFU (measured peak) | "
            "MFU (datasheet) | step temp GiB | args GiB | device peak GiB | note |", "|---" * 13 + "|"]
    for r in report["train"]:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "-")  # noqa: E731
        micro = f"{r.get('num_micro', '-')}" + (" (auto)" if r.get("fit") else "")
        out.append(f"| {r['preset']} | {r['attention_impl']} | {r.get('ran', '')} | {r['batch']}×{r['seq_len']} | "
                   f"{micro} | {f('tokens_per_s', '{:,.0f}')} | {f('tflops', '{:.1f}')} | {f('mfu_measured', '{:.1%}')} | "
                   f"{f('mfu_datasheet', '{:.1%}')} | {f('step_temp_gib', '{:.2f}')} | "
                   f"{f('step_args_gib', '{:.2f}')} | {f('device_peak_gib', '{:.2f}')} | {r.get('error', '')[:120]} |")
    out += ["", "## 4. decode (doge_jax.sampler, greedy, bf16)", "",
            "| preset | batch | decode tok/s | end-to-end tok/s | note |", "|---|---|---|---|---|"]
    for r in report["decode"]:
        f = lambda k: f"{r[k]:,.1f}" if k in r else "-"  # noqa: E731
        out.append(f"| {r['preset']} | {r['batch']} | {f('decode_tok_s')} | {f('end_to_end_tok_s')} | "
                   f"{r.get('error', '')[:120]} |")
    out += ["", "## 5. kernel tiles (bf16, DMA; rows = block_q·R query rows per tile; per-kernel ms from the "
            "profiler)", "", "The table `dma_pallas_gpu` reads (gpu_tiles.TABLE): " + ", ".join(
                f"{k} {t['rows']}×{t['block_k']} w{t['num_warps']} s{t['num_stages']}"
                for k, t in report.get("tile_table", {}).items()), "", "| shape | T | rows | block_k | warps | stages | fwd ms | fwd+bwd ms | forward | dq | dkv | "
            "note |", "|---" * 12 + "|"]
    for r in report.get("tiles", []):
        f = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        out.append(f"| {r.get('shape', '')} | {r.get('T')} | {r.get('rows', '')} | {r.get('block_k')} | "
                   f"{r.get('num_warps')} | {r.get('num_stages')} | {f('fwd_ms')} | {f('fwd+bwd_ms')} | "
                   + " | ".join(f(k + "_ms") for k in KERNELS) + f" | {r.get('error', '')[:120]} |")
    for p in report.get("profile", []):
        out += ["", f"## 6. device time by kernel: {p.get('what', '')} (wall {p.get('wall_ms', 0):.1f} ms, device busy "
                f"{p.get('device_busy_ms', 0):.1f} ms) {p.get('error', '')[:200]}", "",
                "| kernel | ms | calls | share |", "|---|---|---|---|"]
        out += [f"| `{k['name'][:100]}` | {k['ms']:.2f} | {k['calls']} | {k['share']:.1%} |"
                for k in p.get("kernels", [])]
    return "\n".join(out) + "\n"


class Report:
    """The JSON + markdown pair under DIR, rewritten after every row."""

    def __init__(self, out_dir: str, dry: bool):
        self.dir, self.t0 = out_dir, time.perf_counter()
        self.data = {"environment": bench_dma.environment(), "dry_run": dry,
                     "tile_table": {f"H{h}/{walk}": dataclasses.asdict(t) for (h, walk), t in gpu_tiles.TABLE.items()}, "correctness": [], "kernel_time": [],
                     "train": [], "decode": [], "tiles": [], "profile": []}

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


SECTIONS = ("correctness", "kernel_time", "train", "decode", "tiles")


def _train_specs(text: str) -> list[tuple[str, int, object, tuple[str, ...]]]:
    """--train-presets "doge_20m:64,doge_20m:256:auto:auto" → [(preset, batch, micro-batches, impls)]."""
    out = []
    for item in filter(None, text.split(",")):
        preset, *rest = item.split(":")
        batch = int(rest[0]) if rest else TRAIN_BATCH[preset]
        micro = (rest[1] if rest[1] == "auto" else int(rest[1])) if len(rest) > 1 else 1
        impls = tuple(rest[2].split("+")) if len(rest) > 2 else ("auto", "xla")
        out.append((preset, batch, micro, impls))
    return out


def correctness_section(report, dry, over, a):
    cases = DRY_CASES if dry else [c for c in CASES if not a.cases or c[0] in a.cases.split(",")]
    for name, shapes, extra in cases:
        row = guarded(lambda: check_case(name, shapes, extra), {"case": name}, over_budget=over())
        row.setdefault("exception", row.get("error", ""))
        report.add("correctness", row)
        errs = " ".join(f"{k}={v['max_abs']:.1e}/{v['limit']:.1e}" for k, v in row.get("errors", {}).items())
        print(f"{'PASS' if row.get('ok') else 'FAIL'} {name} ({row['seconds']:.0f}s) {errs} {row['exception']}",
              flush=True)


def kernel_time_section(report, dry, over, a):
    lengths, shape, window = ([96], dict(B=1, N=4, K=2, H=16, G=2), 32) if dry else \
        ([int(t) for t in a.kernel_lengths.split(",")], dict(B=1, N=8, K=2, H=128, G=2), 2048)
    report.data["kernel_time_shape"] = {**shape, "keep_window_size": window}
    try:
        report.data["kernel_time"] = bench_dma.run_table(
            lengths, **shape, window=window, dtype=jnp.bfloat16, iters=1 if dry else 10, ref_max_len=16384,
            budget_s=a.budget_s, out="", meta={}, t_start=report.t0)
    except Exception as e:  # noqa: BLE001
        report.data["kernel_time"] = [{"T": 0, "impl": "-", "error": f"{type(e).__name__}: {e}"[:300]}]
    report.data["speedups"] = bench_dma.speedups(report.data["kernel_time"])
    report.save()
    print("\n".join(report.data["speedups"]), flush=True)


def train_section(report, dry, over, a):
    peak = matmul_peak(256 if dry else 8192, seconds=0.2 if dry else 1.0)
    report.data["matmul_peak_tflops"] = peak / 1e12
    seq_len, steps = (64, 1) if dry else (2048, 5)
    specs = ([(p, 2, "auto" if p == "doge_40m_moe" else 1, ("auto", "xla")) for p in DRY_TRAIN_PRESETS] if dry
             else _train_specs(a.train_presets or ",".join(TRAIN_PRESETS)))
    for preset, batch, micro, impls in specs:
        for impl in impls:
            base = {"preset": preset, "attention_impl": impl, "batch": batch, "seq_len": seq_len}
            prof = report.data["profile"] if impl == "auto" else None
            row = guarded(lambda: train_row(preset, impl, batch=batch, seq_len=seq_len, steps=steps, dry=dry,
                                            peak_measured=peak, profile=prof, num_micro=micro), base,
                          over_budget=over())
            report.add("train", row)
            print(f"train {preset} {impl} {batch}x{seq_len} micro-batches {row.get('num_micro')}: "
                  f"{row.get('tokens_per_s', 0):,.0f} tok/s, MFU {row.get('mfu_measured', 0):.1%} "
                  f"{row.get('fit_peaks_gib', '')} {row.get('error', '')}", flush=True)


def decode_section(report, dry, over, a):
    prompt_len, new_tokens = (8, 4) if dry else (32, 128)
    for preset in (DRY_DECODE_PRESETS if dry else DECODE_PRESETS):
        for batch in (1, 16):
            row = guarded(lambda: decode_row(preset, batch, prompt_len=prompt_len, new_tokens=new_tokens, dry=dry),
                          {"preset": preset, "batch": batch}, over_budget=over())
            report.add("decode", row)
            print(f"decode {preset} batch {batch}: {row.get('decode_tok_s', 0):,.1f} tok/s {row.get('error', '')}",
                  flush=True)


def tiles_section(report, dry, over, a):
    print("tile table (doge_jax/kernels/gpu_tiles.py):", report.data["tile_table"], flush=True)
    for label, (T, shape, window) in (DRY_TILE_SHAPES if dry else TILE_SHAPES).items():
        for tiles in (DRY_TILES if dry else TILES):
            base = {"shape": label, "T": T, "rows": tiles[0], "block_k": tiles[1], "num_warps": tiles[2],
                    "num_stages": tiles[3]}
            row = guarded(lambda: {"shape": label, **tile_row(T, tiles, shape=shape, window=window,
                                                              iters=1 if dry else 10)}, base, over_budget=over())
            report.add("tiles", row)
            per_kernel = " ".join(f"{k}={row[k + '_ms']:.3f}" for k in KERNELS if k + "_ms" in row)
            print(f"tiles {label} T={T} {tiles}: fwd {row.get('fwd_ms', 0):.3f} ms, fwd+bwd "
                  f"{row.get('fwd+bwd_ms', 0):.3f} ms {per_kernel} {row.get('error', '')[:200]}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpret mode: checks the script")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new row after this many seconds (default 420; the dry run: no limit)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, in this order: {SECTIONS}")
    p.add_argument("--train-presets", default="",
                   help=f"comma-separated preset[:batch[:micro-batches|auto[:impl+impl]]] (default "
                        f"{','.join(TRAIN_PRESETS)}, batches {TRAIN_BATCH}, both impls)")
    p.add_argument("--cases", default="", help="comma-separated correctness case names (default: all)")
    p.add_argument("--kernel-lengths", default="2048,8192,16384", help="T of the kernel-time table")
    a = p.parse_args(argv)
    dry = a.dry_run
    a.budget_s = a.budget_s if a.budget_s is not None else (1e9 if dry else 420.0)
    report = Report(a.out, dry)
    over = lambda: time.perf_counter() - report.t0 > a.budget_s  # noqa: E731
    print(report.data["environment"], flush=True)
    for section in a.sections.split(","):
        if section not in SECTIONS:
            p.error(f"--sections: {section!r} is not one of {SECTIONS}")
        globals()[f"{section}_section"](report, dry, over, a)

    failed = [r["case"] for r in report.data["correctness"] if not r.get("ok")]
    errors = [f"{s}: {r.get('preset', r.get('impl'))}" for s in ("kernel_time", "train", "decode", "tiles")
              for r in report.data[s] if r.get("error") and not r["error"].startswith("skipped")]
    print(f"correctness: {'all pass' if not failed else 'FAIL ' + ', '.join(failed)}; errors: {errors or 'none'}; "
          f"{time.perf_counter() - report.t0:.0f}s; wrote {a.out}/gpu_check_dma.json and .md", flush=True)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
