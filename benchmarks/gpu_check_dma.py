"""One GPU check of the DMA kernel, a few minutes on an H100: correctness against the reference, then the timings.

    python benchmarks/gpu_check_dma.py --out $OUT

1. Correctness (Triton, not interpret): output and q/k/v/dt gradients vs the XLA reference at a few shapes:
   fp32 with full-precision matmuls on both sides (|Δout| ≤ 1e-4, |Δgrad| ≤ 1e-3·max|grad|); bf16 judged against
   an fp32 reference of the same inputs (the kernel's error ≤ 2× the bf16 reference's own error + 1e-2).
2. The timing table of benchmarks/bench_dma.py at T = 1k…16k (the XLA reference up to 8k), fwd and fwd+bwd.
Writes $OUT/gpu_check_dma.json after every step, so a timeout still leaves what was measured.
"""

from __future__ import annotations

import argparse
import os
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
from doge_jax.kernels.gpu_dma import dma_pallas_gpu  # noqa: E402
from doge_jax.model.dma_reference import dma_reference  # noqa: E402
from doge_jax.model.mask import MaskSpec  # noqa: E402

# name, shapes, keyword arguments shared by kernel and reference
CASES = [
    ("fp32_gqa2_h64_leftpad_sparse", dict(B=2, T=1000, N=4, K=2, H=64, G=2, dtype="float32"),
     dict(keep_window_size=256, left_pad=(0, 77))),
    ("fp32_gqa4_h128_bias_per_head_segments", dict(B=1, T=777, N=8, K=2, H=128, G=8, dtype="float32"),
     dict(keep_window_size=128, segments=(300, 600))),
    ("fp32_mha_h128_window", dict(B=1, T=640, N=2, K=2, H=128, G=2, dtype="float32"),
     dict(keep_window_size=64, sliding_window=200)),
    ("bf16_gqa4_h128_sparse_4k", dict(B=1, T=4096, N=8, K=2, H=128, G=2, dtype="bfloat16"),
     dict(keep_window_size=1024)),
]


def _mask_kwargs(B, T, extra):
    kw = {"keep_window_size": extra["keep_window_size"]}
    if "left_pad" in extra:
        kw["kv_mask"] = jnp.arange(T)[None, :] >= jnp.asarray(extra["left_pad"])[:, None]
    if "segments" in extra:
        seg = jnp.zeros((B, T), jnp.int32)
        for start in extra["segments"]:
            seg = seg + (jnp.arange(T) >= start)
        kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    if "sliding_window" in extra:
        kw["sliding_window"] = extra["sliding_window"]
    return kw


def _vjp(fn, args, do):
    out, pull = jax.vjp(jax.jit(fn), *args)
    return [out, *pull(do)]


def check_case(name, shapes, extra):
    shapes = dict(shapes)
    dtype = jnp.dtype(shapes.pop("dtype"))
    args, do = bench_dma.make_inputs(0, dtype=dtype, **shapes)
    mask, scale = MaskSpec(**_mask_kwargs(shapes["B"], shapes["T"], extra)), shapes["H"] ** -0.5
    kernel = lambda *a: dma_pallas_gpu(*a, mask, scale=scale)  # noqa: E731
    reference = lambda *a: dma_reference(*a, mask, scale=scale)  # noqa: E731
    names = ["out", "dq", "dk", "dv", "ddt"]
    got = _vjp(kernel, args, do)
    with jax.default_matmul_precision("highest"):
        args32 = [a.astype(jnp.float32) for a in args]
        want = _vjp(reference, args32, do.astype(jnp.float32))
        ref_low = _vjp(reference, args, do) if dtype != jnp.float32 else None
    result = {"case": name, "ok": True, "errors": {}}
    for i, n in enumerate(names):
        g, w = np.asarray(got[i], np.float32), np.asarray(want[i], np.float32)
        scale = max(1.0, float(np.max(np.abs(w))))
        err = float(np.max(np.abs(g - w)))
        if ref_low is None:
            limit = 1e-4 if n == "out" else 1e-3 * scale
        else:
            own = float(np.max(np.abs(np.asarray(ref_low[i], np.float32) - w)))
            limit = 2 * own + 1e-2 * scale
        result["errors"][n] = {"max_abs": err, "limit": limit}
        result["ok"] &= bool(np.isfinite(err) and err <= limit)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--ref-max-len", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=200.0, help="stop starting new timings after this")
    p.add_argument("--skip-correctness", action="store_true")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    path = os.path.join(a.out, "gpu_check_dma.json")
    report = {**bench_dma.environment(), "correctness": [], "rows": []}
    print(report, flush=True)
    if not a.skip_correctness:
        for name, shapes, extra in CASES:
            t0 = time.perf_counter()
            try:
                res = check_case(name, shapes, extra)
            except Exception as e:  # noqa: BLE001 (a failing case is a result; the others still run)
                res = {"case": name, "ok": False, "exception": f"{type(e).__name__}: {e}"[:2000],
                       "traceback": traceback.format_exc()[-4000:]}
            res["seconds"] = time.perf_counter() - t0
            report["correctness"].append(res)
            errs = " ".join(f"{k}={v['max_abs']:.1e}/{v['limit']:.1e}" for k, v in res.get("errors", {}).items())
            print(f"{'PASS' if res['ok'] else 'FAIL'} {name} ({res['seconds']:.0f}s) {errs} {res.get('exception', '')}",
                  flush=True)
            bench_dma.write_json(path, report)
    shape = dict(B=1, N=8, K=2, H=128, G=2)
    report["table_shape"] = {**shape, "keep_window_size": 2048, "dtype": "bfloat16"}
    lengths = [int(x) for x in a.lengths.split(",")]
    report["rows"] = bench_dma.run_table(
        lengths, **shape, window=2048, dtype=jnp.bfloat16, iters=5, ref_max_len=a.ref_max_len,
        budget_s=a.budget_s, out=path, meta={k: v for k, v in report.items() if k != "rows"}, t_start=t_start)
    report["speedups"] = bench_dma.speedups(report["rows"])
    report["seconds"] = time.perf_counter() - t_start
    bench_dma.write_json(path, report)
    print("\n".join(report["speedups"]))
    print(f"all correctness cases pass: {all(r['ok'] for r in report['correctness'])}; {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
