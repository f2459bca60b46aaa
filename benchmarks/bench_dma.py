"""DMA speed: the Pallas kernel vs the XLA reference vs cuDNN attention (jax.nn.dot_product_attention) with the
DMA bias materialized as a [B, N, T, S] tensor.

    python benchmarks/bench_dma.py --lengths 1024,2048,4096,8192,16384,32768 --out bench_dma.json

TFLOP/s use one FLOP count for every implementation: causal dense attention, 4·B·N·H·T²/2 forward and 3.5× that for
forward+backward. That is the work a dense causal kernel does; the XLA reference does twice as much (no causal
skipping) and the sparse kernel walk about keep_window_size + chunk keys per row (`walked` column: its fraction of the
causal keys). cuDNN gets its bias precomputed outside the timed region (its best case); attention_fns says exactly what each
implementation computes.
The kernel timing includes its top-k bookkeeping (thresholds, key permutation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dma_walk import walked_keys  # noqa: E402
from doge_jax.kernels import topk as _topk  # noqa: E402
from doge_jax.kernels.gpu_dma import dma_pallas_gpu  # noqa: E402
from doge_jax.model.dma_reference import dma_reference  # noqa: E402
from doge_jax.model.mask import MaskSpec, masked_bias  # noqa: E402


def make_inputs(seed, *, B, T, N, K, H, G, dtype):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32).astype(dtype)
    dt = jnp.exp(0.5 * jax.random.normal(ks[3], (B, G, T), jnp.float32))  # dt = exp(A·softplus(·)) > 0, continuous
    do = jax.random.normal(ks[4], (B, T, N, H), jnp.float32).astype(dtype)
    return (q, k, v, dt), do


def attention_fns(args, *, window: int, scale: float, with_cudnn: bool = True):
    """name → (fn(*diff_args, *const_args), diff_args, const_args). Every array is an argument of the jitted
    program (a closed-over array would be inlined as a program constant: a 4 GiB bias at T = 16k costs host memory
    and minutes of compile). Only diff_args are differentiated.

    What each side computes (all causal, bf16 in, fp32 softmax):
    - pallas: the DMA kernel, top-k bookkeeping included, gradients of q, k, v and dt (dt's through the bias).
    - xla: the plain-jnp reference: [B, N, T, S] scores, no causal skipping, gradients of q, k, v and dt.
    - cudnn: cuDNN flash attention with is_causal and the DMA bias materialised as [B, N, T, S] before the timed
      region (its best case); gradients of q, k, v. jax's cuDNN API computes a bias gradient whenever a bias is
      passed (has_dbias = has_bias in jax._src.cudnn.fused_attention_stablehlo), so its backward writes one more
      [B, N, T, S] tensor than the DMA kernel's: that is why cudnn_nobias is timed too.
    - cudnn_nobias: cuDNN causal flash attention with no bias at all: a floor for any biased kernel, not DMA."""
    q, k, v, dt = args
    B, T, N, _ = q.shape
    mask = MaskSpec(keep_window_size=window)

    def kernel(q, k, v, dt):
        return dma_pallas_gpu(q, k, v, dt, mask, scale=scale)

    def reference(q, k, v, dt):
        return dma_reference(q, k, v, dt, mask, scale=scale)

    fns = {"pallas": (kernel, (q, k, v, dt), ()), "xla": (reference, (q, k, v, dt), ())}
    if with_cudnn and jax.default_backend() == "gpu":
        @jax.jit
        def materialise(dt):
            bias = masked_bias(dt, mask.allowed(B, T, T), window)  # [B, G, T, S]
            bias = jnp.repeat(bias, N // bias.shape[1], axis=1)  # [B, N, T, S]: one bias per query head
            return jnp.maximum(bias, -1e30).astype(q.dtype)  # float32 min overflows bf16 to -inf

        def cudnn(q, k, v, bias):
            return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=True,
                                                implementation="cudnn")

        def cudnn_nobias(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")

        fns["cudnn"] = (cudnn, (q, k, v), (jax.block_until_ready(materialise(dt)),))
        fns["cudnn_nobias"] = (cudnn_nobias, (q, k, v), ())
    return fns


def compile_modes(fn, diff_args, const_args, do):
    """{"fwd": compiled, "fwd+bwd": compiled}; fwd takes (*diff_args, *const_args), fwd+bwd (*those, do)."""
    n = len(diff_args)
    fwd = jax.jit(fn)

    def loss(*a):
        *a, do = a
        return jnp.sum(fn(*a).astype(jnp.float32) * do.astype(jnp.float32))

    fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(n))))
    return {"fwd": fwd.lower(*diff_args, *const_args).compile(),
            "fwd+bwd": fwd_bwd.lower(*diff_args, *const_args, do).compile()}


def time_ms(compiled, args, *, iters: int, max_s: float = 20.0) -> float:
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    start = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_s:
            break
    return 1e3 * float(np.median(times))


def causal_flops(B, T, N, H) -> float:
    return 4.0 * B * N * H * T * T / 2


def walked_fraction(dt, *, T, window, block_q, block_k) -> float:
    """Keys the sparse walk reads / causal keys, for this dt (1.0 when the kernel walks densely)."""
    if T < 2 * window:
        return 1.0
    s_pad = -(-T // block_k) * block_k
    chunk = _topk.default_chunk(s_pad, block_k)
    dtm = jnp.pad(dt[:, :, None, :], ((0, 0), (0, 0), (0, 0), (0, s_pad - T)), constant_values=-jnp.inf)
    thrpos = _topk.prefix_thresholds(dtm, window)
    n_q = -(-T // block_q)
    _, ntab, _ = _topk.sparse_plan(thrpos, dtm, q_offset=0, n_q_tiles=n_q, block_q=block_q, block_k=block_k,
                                   chunk=chunk)
    walked = float(jnp.sum(walked_keys(ntab, n_keys=s_pad, q_offset=0, block_q=block_q, block_k=block_k,
                                             chunk=chunk)))
    causal = dt.shape[0] * dt.shape[1] * sum(min(T, (i + 1) * block_q) for i in range(n_q))
    return walked / causal


def write_json(path: str, payload) -> None:
    """Atomic: a reader never sees a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def run_table(lengths, *, B, N, K, H, G, window, dtype, iters, ref_max_len, budget_s, out, meta, t_start):
    """Times every (length, implementation, mode); returns the rows (also written to `out` after each one)."""
    rows = []
    for T in lengths:
        args, do = make_inputs(T, B=B, T=T, N=N, K=K, H=H, G=G, dtype=dtype)
        flops = causal_flops(B, T, N, H)
        R = N // K
        frac = walked_fraction(args[3].reshape(B, K, G // K, T)[:, :, 0], T=T, window=window,
                               block_q=max(1, 64 // R), block_k=64)
        try:
            fns = attention_fns(args, window=window, scale=H**-0.5)
        except Exception as e:  # noqa: BLE001 (e.g. the materialised bias does not fit): the kernel rows still run
            print(f"T={T}: cuDNN bias not built ({type(e).__name__}: {str(e)[:200]})", flush=True)
            fns = attention_fns(args, window=window, scale=H**-0.5, with_cudnn=False)
        for name, (fn, diff_args, const_args) in fns.items():
            row = {"T": T, "impl": name, "walked": frac if name == "pallas" else (2.0 if name == "xla" else 1.0)}
            if name == "xla" and T > ref_max_len:
                row["error"] = f"skipped: T > --ref-max-len={ref_max_len}"
            elif time.perf_counter() - t_start > budget_s:
                row["error"] = f"skipped: over --budget-s={budget_s}"
            else:
                try:
                    compiled = compile_modes(fn, diff_args, const_args, do)
                    for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                        call_args = (*diff_args, *const_args) + ((do,) if mode == "fwd+bwd" else ())
                        ms = time_ms(compiled[mode], call_args, iters=iters)
                        row[f"{mode}_ms"] = ms
                        row[f"{mode}_tflops"] = mult * flops / (ms * 1e-3) / 1e12
                except Exception as e:  # noqa: BLE001 (OOM, unsupported backend: recorded, the table goes on)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(format_row(row), flush=True)
            if out:
                write_json(out, {**meta, "rows": rows})
    return rows


def format_row(row) -> str:
    def cell(key, fmt):
        return fmt.format(row[key]) if key in row else "-"

    text = (f"T={row['T']:>6} {row['impl']:>7}  fwd {cell('fwd_ms', '{:9.3f}')} ms {cell('fwd_tflops', '{:6.1f}')} "
            f"TF/s   fwd+bwd {cell('fwd+bwd_ms', '{:9.3f}')} ms {cell('fwd+bwd_tflops', '{:6.1f}')} TF/s   "
            f"walked {row['walked']:.2f}")
    return text + (f"   [{row['error']}]" if "error" in row else "")


def speedups(rows) -> list[str]:
    lines = []
    by = {(r["T"], r["impl"]): r for r in rows}
    for T in sorted({r["T"] for r in rows}):
        kern = by.get((T, "pallas"), {})
        for other in ("xla", "cudnn", "cudnn_nobias"):
            o = by.get((T, other), {})
            parts = [f"{mode} {o[f'{mode}_ms'] / kern[f'{mode}_ms']:.2f}x" for mode in ("fwd", "fwd+bwd")
                     if f"{mode}_ms" in kern and f"{mode}_ms" in o]
            if parts:
                lines.append(f"T={T:>6} pallas vs {other}: " + ", ".join(parts))
    return lines


def environment() -> dict:
    return {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bias-per-query-head", action="store_true", help="G = N (older SmallDoge layout)")
    p.add_argument("--keep-window-size", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--ref-max-len", type=int, default=16384, help="the XLA reference materializes [B,N,T,T]")
    p.add_argument("--budget-s", type=float, default=1e9)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    lengths = [int(x) for x in a.lengths.split(",")]
    G = a.heads if a.bias_per_query_head else a.kv_heads
    meta = {**environment(), "batch": a.batch, "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
            "bias_heads": G, "keep_window_size": a.keep_window_size, "dtype": a.dtype,
            "flops": "causal dense: 4*B*N*H*T^2/2 (fwd), x3.5 (fwd+bwd)"}
    print(meta)
    rows = run_table(lengths, B=a.batch, N=a.heads, K=a.kv_heads, H=a.head_dim, G=G, window=a.keep_window_size,
                     dtype=jnp.dtype(a.dtype), iters=a.iters, ref_max_len=a.ref_max_len, budget_s=a.budget_s,
                     out=a.out, meta=meta, t_start=time.perf_counter())
    print("\n".join(speedups(rows)))


if __name__ == "__main__":
    main()
