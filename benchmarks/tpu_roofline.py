"""The TPU roofline of the Mosaic DMA kernel (doge_jax.kernels.tpu_flash), on paper: no TPU needed.

    python benchmarks/tpu_roofline.py                      # doge_160m at T = 2048, and T = 16384 with w = 2048
    python benchmarks/tpu_roofline.py --seq 4096 --heads 8 --kv-heads 4 --head-dim 64

Counts what the kernel does at its default tiles: the (query tile, key block) pairs its block tables visit (causal
band at block granularity), the MXU FLOPs of each pass (2·m·n·k per matmul) and the HBM bytes its BlockSpecs move
(a block is fetched again only when its index changes between grid steps). Times are at the chip's peak:
max(FLOPs / peak FLOP/s, bytes / HBM bandwidth); the elementwise mask, exp and the per-step overhead are not
counted, so a measured kernel will be slower — this is the number to beat, not a prediction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doge_jax.kernels import tpu_dma  # noqa: E402

V5E_FLOPS = 197e12  # bf16 MXU peak, FLOP/s
V5E_HBM = 819e9  # bytes/s


def roofline(*, t: int, heads: int, kv_heads: int, head_dim: int, keep: int, window: int | None = None,
             batch: int = 1, itemsize: int = 2) -> dict:
    r = heads // kv_heads
    block_q, block_k = tpu_dma._block_sizes(t, t, r, None, None)
    rows, hp = block_q * r, -(-head_dim // 128) * 128
    topk = t > keep and (window is None or window > keep)
    n_q, n_kb = -(-t // block_q), -(-t // block_k)
    _, steps = tpu_dma._block_tables(b=1, t=t, s=t, offset=0, block_q=block_q, block_k=block_k,
                                     sliding_window=window, valid=jnp.ones((1, n_kb * block_k), bool))
    fwd_pairs, dkv_pairs = steps["fwd_pairs"], steps["dkv_pairs"]  # per (batch row, kv head)
    units = batch * kv_heads  # (batch, kv head) programs
    bias_rows = 1  # G = K (the transformers layout)
    row_vec = 4 * rows  # one int32/fp32 per row: qpos, thr, lse, delta
    key_side = 2 * block_k * hp * itemsize + (bias_rows + 1) * block_k * 4  # k, v, dt, kpos
    q_side = rows * hp * itemsize

    def per_pass(matmuls, pairs, tile_bytes, pair_bytes, outer):
        flops = 2 * matmuls * rows * block_k * hp * pairs * units
        nbytes = (tile_bytes * outer + pair_bytes * pairs) * units
        return flops, nbytes

    n_row_vecs = 1 + topk
    passes = {
        "forward": per_pass(2, fwd_pairs, 2 * q_side + n_row_vecs * row_vec + rows * 128 * 4, key_side, n_q),
        "backward dQ": per_pass(3, fwd_pairs, 3 * q_side + (n_row_vecs + 2) * row_vec, key_side, n_q),
        "backward dK/dV": per_pass(4, dkv_pairs, 2 * key_side + bias_rows * block_k * 4,
                                   2 * q_side + (n_row_vecs + 2) * row_vec, n_kb),
    }
    causal_ideal = 4 * hp * heads * batch * (t * (t + 1) / 2 if not topk else t * keep - keep * (keep - 1) / 2)
    grid_steps = units * (n_q * steps["kv_steps"] * 2 + n_kb * steps["q_steps"])  # forward + dQ + dK/dV
    return dict(block_q=block_q, block_k=block_k, rows=rows, head_dim_padded=hp, topk=topk, fwd_pairs=fwd_pairs,
                dkv_pairs=dkv_pairs, pairs_total=n_q * n_kb, passes=passes, forward_flops_kept_keys=causal_ideal,
                grid_steps=grid_steps)


def _us(flops, nbytes):
    return flops / V5E_FLOPS * 1e6, nbytes / V5E_HBM * 1e6


def report(name: str, **kw) -> None:
    rf = roofline(**kw)
    rows, bk, hp = rf["rows"], rf["block_k"], rf["head_dim_padded"]
    print(f"\n{name}: {kw}")
    print(f"  tiles: block_q={rf['block_q']} positions × R = {rows} rows, block_k={bk}, head dim → {hp} lanes; "
          f"top-k active: {rf['topk']}")
    print(f"  per (tile, block) pair: forward {4 * rows * bk * hp / 1e6:.0f} MFLOP, dQ {6 * rows * bk * hp / 1e6:.0f}, "
          f"dK/dV {8 * rows * bk * hp / 1e6:.0f}; K/V tile {2 * bk * hp * kw.get('itemsize', 2) / 1e3:.0f} kB, "
          f"q/do tile {2 * rows * hp * kw.get('itemsize', 2) / 1e3:.0f} kB")
    print(f"  pairs visited: forward/dQ {rf['fwd_pairs']}, dK/dV {rf['dkv_pairs']} of {rf['pairs_total']} "
          f"per (batch, kv head); {rf['grid_steps']} grid steps in all three passes (skipped ones included)")
    total_t = 0.0
    print(f"  {'pass':16s} {'GFLOP':>8s} {'MB':>8s} {'MXU µs':>8s} {'HBM µs':>8s} {'bound':>8s}")
    for pass_name, (flops, nbytes) in rf["passes"].items():
        mxu, hbm = _us(flops, nbytes)
        total_t += max(mxu, hbm)
        print(f"  {pass_name:16s} {flops / 1e9:8.2f} {nbytes / 1e6:8.2f} {mxu:8.1f} {hbm:8.1f} "
              f"{'MXU' if mxu >= hbm else 'HBM':>8s}")
    fwd_mxu = _us(rf["passes"]["forward"][0], 0)[0]
    ideal = _us(rf["forward_flops_kept_keys"], 0)[0]
    print(f"  fwd + bwd ≥ {total_t:.0f} µs per layer on v5e; forward on the kept keys only would be {ideal:.0f} µs "
          f"of MXU (the kernel's forward: {fwd_mxu:.0f} µs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--keep", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(f"v5e peak: {V5E_FLOPS / 1e12:.0f} TFLOP/s bf16, {V5E_HBM / 1e9:.0f} GB/s; bf16 q/k/v, one layer")
    shape = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, batch=args.batch)
    if args.seq is not None:
        report("custom", t=args.seq, keep=args.keep, **shape)
        return
    report("doge_160m layer, T = 2048", t=2048, keep=2048, **shape)
    report("doge_160m layer, T = 16384, keep_window_size = 2048", t=16384, keep=2048, **shape)


if __name__ == "__main__":
    main()
