"""The TPU roofline of the Mosaic DMA kernel (doge_jax.kernels.tpu_flash), on paper, and its compile for real chips.

    python benchmarks/tpu_roofline.py                      # doge_160m at T = 2048, and the sparse walk at 4k/8k/16k
    python benchmarks/tpu_roofline.py --seq 4096 --heads 8 --kv-heads 4 --head-dim 64
    # jax ≥ 0.11 with libtpu (FIELD-NOTES, "Compiling for a real TPU on a CPU host"):
    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/tpu_roofline.py --compile v5e:2x2,v6e:2x2,v5p:2x2x1

Roofline: counts what the kernel does at its default tiles: the (query tile, key block) pairs its walks visit (the
band walk: the causal band at block granularity; the sparse walk: the plan `dma_pallas_tpu` builds, here for
random normal dt), the MXU FLOPs of each pass (2·m·n·k per matmul) and the HBM bytes it moves (each visited pair
copies its walked block once). Times are at v5e's peak: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth); the
elementwise mask, exp and the per-step overhead are not counted, so a measured kernel will be slower: this is the
number to beat, not a prediction. The sparse walk also reports the blocks it visits against the blocks of its key
layout that hold a kept key (some row of the tile keeps one of its keys).

--compile: each of the three kernels alone (its scoped VMEM, read from the compiler by compiling under a limit
too small for it) and a whole forward + backward of one doge_160m layer (compile time, HBM from
memory_analysis()), for each chip.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doge_jax.kernels import shared, topk, tpu_dma, tpu_flash  # noqa: E402
from doge_jax.model.mask import MaskSpec  # noqa: E402

V5E_FLOPS = 197e12  # bf16 MXU peak, FLOP/s
V5E_HBM = 819e9  # bytes/s


def sparse_walk(*, t: int, keep: int, kv_heads: int, r_heads: int, seed: int = 0) -> dict:
    """The sparse walk's plan for random normal dt [1, kv_heads, t] at the default tiles: pairs visited (forward/dQ
    and dK/dV: the same set) and pairs whose block holds a key some row of the tile keeps, summed over kv heads."""
    block_q, block_k = tpu_dma._block_sizes(t, t, r_heads, None, None, sparse=True)
    chunk = topk.default_chunk(-(-t // block_k) * block_k, block_k)
    s_pad, t_pad = -(-t // chunk) * chunk, -(-t // block_q) * block_q
    dt = jax.random.normal(jax.random.key(seed), (1, kv_heads, t), jnp.float32)
    mask = MaskSpec(keep_window_size=keep)
    valid = jnp.arange(s_pad)[None] < t
    dt_w = jnp.pad(dt, ((0, 0), (0, 0), (0, s_pad - t)))[:, :, None, :]
    thr, _, _ = shared.topk_setup(dt, dt_w, valid, mask, t=t, t_pad=t_pad, block_q=block_q, block_k=block_k,
                                  sparse=False, chunk=None)
    perm, tables = tpu_dma._sparse_tables(thr=thr, dt_w=dt_w, valid=valid, mask=mask, t=t, block_q=block_q,
                                          block_k=block_k, chunk=chunk)
    n_q = t_pad // block_q
    thr_rows = np.asarray(thr)[0, :, 0]  # [K, T_p], non-decreasing
    d, keys = np.asarray(dt_w)[0, :, 0], np.arange(s_pad)
    holding = 0
    for h in range(kv_heads):
        # Tile i keeps key s ≤ its last row iff dt[s] ≥ the threshold of its first row that may see s.
        needed = np.stack([(keys < min((i + 1) * block_q, t)) & valid[0] & (d[h] >= thr_rows[h][np.minimum(
            np.maximum(keys, i * block_q), t - 1)]) for i in range(n_q)])
        in_layout = needed[:, np.asarray(perm)[0, h]].reshape(n_q, s_pad // block_k, block_k)
        holding += int(in_layout.any(-1).sum())
    visited = int(np.asarray(tables["run_n"]).sum())
    assert visited == int(np.asarray(tables["q_n"]).sum())  # both walks visit the same pairs
    return dict(block_q=block_q, block_k=block_k, chunk=chunk, n_q=n_q, n_kb=s_pad // block_k, visited=visited,
                holding=holding)


def roofline(*, t: int, heads: int, kv_heads: int, head_dim: int, keep: int, window: int | None = None,
             batch: int = 1, itemsize: int = 2, sparse: bool | None = None) -> dict:
    r = heads // kv_heads
    mask = MaskSpec(keep_window_size=keep, sliding_window=window)
    sparse = tpu_dma._sparse_walk(mask, t, sparse)
    topk_active = t > keep and (window is None or window > keep)
    units = batch * kv_heads  # (batch, kv head) programs
    if sparse:
        walk = sparse_walk(t=t, keep=keep, kv_heads=kv_heads, r_heads=r)
        block_q, block_k, n_q, n_kb = walk["block_q"], walk["block_k"], walk["n_q"], walk["n_kb"]
        fwd_pairs = dkv_pairs = walk["visited"] * batch  # summed over kv heads already
        units_per_pair = 1
    else:
        walk = None
        block_q, block_k = tpu_dma._block_sizes(t, t, r, None, None)
        n_q, n_kb = -(-t // block_q), -(-t // block_k)
        _, pairs = tpu_dma._band_tables(b=1, kh=1, t=t, s=t, offset=0, block_q=block_q, block_k=block_k,
                                        sliding_window=window, valid=jnp.ones((1, n_kb * block_k), bool))
        fwd_pairs, dkv_pairs = pairs["fwd_pairs"], pairs["dkv_pairs"]  # per (batch row, kv head)
        units_per_pair = units
    rows, hp = block_q * r, -(-head_dim // 128) * 128
    bias_rows = 1  # G = K (the transformers layout)
    row_vec = 4 * rows  # one int32/fp32 per row: qpos, thr, lse, delta
    key_side = 2 * block_k * hp * itemsize + (bias_rows + 1) * block_k * 4  # k, v, dt, kpos
    q_side = rows * hp * itemsize

    def per_pass(matmuls, pairs, tile_bytes, pair_bytes, outer):
        flops = 2 * matmuls * rows * block_k * hp * pairs * units_per_pair
        nbytes = tile_bytes * outer * units + pair_bytes * pairs * units_per_pair
        return flops, nbytes

    n_row_vecs = 1 + topk_active
    passes = {
        "forward": per_pass(2, fwd_pairs, 2 * q_side + n_row_vecs * row_vec + rows * 128 * 4, key_side, n_q),
        "backward dQ": per_pass(3, fwd_pairs, 3 * q_side + (n_row_vecs + 2) * row_vec, key_side, n_q),
        "backward dK/dV": per_pass(4, dkv_pairs, 2 * key_side + bias_rows * block_k * 4,
                                   2 * q_side + (n_row_vecs + 2) * row_vec, n_kb),
    }
    causal_ideal = 4 * hp * heads * batch * (t * (t + 1) / 2 if not topk_active else t * keep - keep * (keep - 1) / 2)
    return dict(block_q=block_q, block_k=block_k, rows=rows, head_dim_padded=hp, topk=topk_active, sparse=sparse,
                walk=walk, fwd_pairs=fwd_pairs * units_per_pair, dkv_pairs=dkv_pairs * units_per_pair,
                pairs_total=units * n_q * n_kb, passes=passes, forward_flops_kept_keys=causal_ideal,
                programs=units * (2 * n_q + n_kb))


def _us(flops, nbytes):
    return flops / V5E_FLOPS * 1e6, nbytes / V5E_HBM * 1e6


def report(name: str, **kw) -> float:
    """Prints the roofline of one call; returns its fwd + bwd time bound in µs."""
    rf = roofline(**kw)
    rows, bk, hp = rf["rows"], rf["block_k"], rf["head_dim_padded"]
    print(f"\n{name}: {kw}")
    print(f"  {'sparse' if rf['sparse'] else 'band'} walk; tiles: block_q={rf['block_q']} positions × R = {rows} rows, "
          f"block_k={bk}, head dim → {hp} lanes; top-k active: {rf['topk']}")
    print(f"  per (tile, block) pair: forward {4 * rows * bk * hp / 1e6:.0f} MFLOP, dQ {6 * rows * bk * hp / 1e6:.0f}, "
          f"dK/dV {8 * rows * bk * hp / 1e6:.0f}; K/V block {2 * bk * hp * kw.get('itemsize', 2) / 1e3:.0f} kB, "
          f"q/do tile {2 * rows * hp * kw.get('itemsize', 2) / 1e3:.0f} kB")
    walk = rf["walk"]
    if walk:
        print(f"  sparse walk (chunks of {walk['chunk']} keys, random normal dt): visits {walk['visited']} "
              f"(tile, block) pairs, {walk['holding']} of which hold a kept key: "
              f"{walk['visited'] / walk['holding']:.3f}×")
    print(f"  pairs visited: forward/dQ {rf['fwd_pairs']}, dK/dV {rf['dkv_pairs']} of {rf['pairs_total']} in all; "
          f"{rf['programs']} programs in the three passes")
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
    return total_t


# --- compiled for a real chip ------------------------------------------------------------------------------------

def _scoped_vmem(kernel, args) -> tuple[float, float]:
    """(MiB of scoped VMEM, seconds to compile): the smallest scoped-VMEM limit the kernel compiles under, found by
    compiling under 256 KiB and then under each size the compiler's refusal names (XLA may stage small operands in
    VMEM as the limit grows, so a refusal's size is a lower bound, not the answer), and the time of the last one."""
    def compiled():  # a fresh function each time: jit's trace cache would keep the first limit
        return jax.jit(lambda *a: kernel(*a)).trace(*args).lower().compile()

    limit, need = tpu_flash._VMEM_LIMIT, 2**18
    try:
        for _ in range(12):
            tpu_flash._VMEM_LIMIT = need
            start = time.time()
            try:
                compiled()
                return need / 2**20, time.time() - start
            except Exception as e:  # noqa: BLE001 — the refusal carries the figure
                found = re.search(r"Scoped allocation with size ([\d.]+)([KMG])", str(e))
                if not found:
                    raise
                size = float(found.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30}[found.group(2)]
                need = max(need + 2**16, int(size) + 2**16)
        raise RuntimeError(f"no scoped VMEM limit up to {need / 2**20:.1f} MiB compiled")
    finally:
        tpu_flash._VMEM_LIMIT = limit


def compile_report(chip: str, *, t: int, keep: int, heads: int, kv_heads: int, head_dim: int) -> None:
    """The three kernels alone (scoped VMEM) and a layer's forward + backward (compile time, HBM) for `chip`."""
    from jax.experimental import topologies

    from doge_jax.kernels import target

    device = topologies.get_topology_desc(chip, "tpu").devices[0]
    placed = jax.sharding.SingleDeviceSharding(device)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=placed)

    r, hp = heads // kv_heads, -(-head_dim // 128) * 128
    mask = MaskSpec(keep_window_size=keep)
    sparse = tpu_dma._sparse_walk(mask, t, None)
    block_q, block_k = tpu_dma._block_sizes(t, t, r, None, None, sparse=sparse)
    chunk = topk.default_chunk(-(-t // block_k) * block_k, block_k) if sparse else block_k
    s_pad, n_rows = -(-t // chunk) * chunk, -(-t // block_q) * block_q * r
    n_q, n_kb, runs = n_rows // (block_q * r), s_pad // block_k, s_pad // chunk if sparse else 1
    cfg = tpu_flash.TpuKernelConfig(scale=head_dim ** -0.5, block_q=block_q, block_k=block_k, heads_per_kv=r,
                                    bias_rows=1, sliding_window=None, has_thr=t > keep, has_segments=False,
                                    kv_runs=runs, run_stride=chunk // block_k if sparse else 0)
    q, row = spec((1, kv_heads, n_rows, hp), jnp.bfloat16), spec((1, kv_heads, 1, n_rows), jnp.float32)
    kv = spec((1, kv_heads, s_pad, hp), jnp.bfloat16)
    meta = dict(kpos=spec((1, kv_heads, 1, s_pad), jnp.int32), qpos=spec((1, 1, n_rows), jnp.int32),
                run_lo=spec((kv_heads * n_q * runs,), jnp.int32), run_n=spec((kv_heads * n_q * runs,), jnp.int32),
                q_lo=spec((kv_heads * n_kb,), jnp.int32), q_n=spec((kv_heads * n_kb,), jnp.int32))
    if cfg.has_thr:
        meta["thr"] = row
    dt = spec((1, kv_heads, 1, s_pad), jnp.float32)
    kernels = {
        "forward": (lambda q, k, v, dt, m: tpu_flash._forward(cfg, q, k, v, dt, m), (q, kv, kv, dt, meta)),
        "backward dQ": (lambda q, k, v, dt, m, do, lse, delta: tpu_flash._backward_dq(cfg, q, k, v, dt, m, do, lse,
                                                                                       delta),
                        (q, kv, kv, dt, meta, q, row, row)),
        "backward dK/dV": (lambda q, k, v, dt, m, do, lse, delta: tpu_flash._backward_dkv(cfg, q, k, v, dt, m, do,
                                                                                           lse, delta),
                           (q, kv, kv, dt, meta, q, row, row)),
    }
    print(f"\n{chip}, T = {t}, keep_window_size = {keep}, {'sparse' if sparse else 'band'} walk, tiles {block_q}×{r} "
          f"rows × {block_k} keys, head dim {hp}, bf16")
    for name, (kernel, args) in kernels.items():
        vmem, secs = _scoped_vmem(kernel, args)
        print(f"  {name:16s} scoped VMEM {vmem:6.2f} MiB, compiled alone in {secs:5.1f} s")

    def layer(q, k, v, dt):
        o = tpu_dma.dma_pallas_tpu(q, k, v, dt, mask, scale=head_dim ** -0.5)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    args = (spec((1, t, heads, head_dim), jnp.bfloat16), spec((1, t, kv_heads, head_dim), jnp.bfloat16),
            spec((1, t, kv_heads, head_dim), jnp.bfloat16), spec((1, kv_heads, t), jnp.float32))
    with target.lowering_for("tpu"):
        start = time.time()
        compiled = jax.jit(jax.grad(layer, argnums=(0, 1, 2, 3))).trace(*args).lower().compile()
        secs = time.time() - start
    memory = compiled.memory_analysis()
    calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    print(f"  layer fwd + bwd ({calls} Mosaic calls and the XLA around them): compiled in {secs:.1f} s; HBM: arguments "
          f"{memory.argument_size_in_bytes / 2**20:.1f} MiB, temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--keep", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile", default=None, help="comma-separated TPU topologies, e.g. v5e:2x2,v6e:2x2")
    args = parser.parse_args()
    shape = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    if args.compile:
        for chip in args.compile.split(","):
            for t in ([args.seq] if args.seq else [2048, 16384]):
                compile_report(chip, t=t, keep=args.keep, **shape)
        return
    print(f"v5e peak: {V5E_FLOPS / 1e12:.0f} TFLOP/s bf16, {V5E_HBM / 1e9:.0f} GB/s; bf16 q/k/v, one layer")
    shape["batch"] = args.batch
    if args.seq is not None:
        report("custom", t=args.seq, keep=args.keep, **shape)
        return
    report("doge_160m layer, T = 2048", t=2048, keep=2048, **shape)
    for t in (4096, 8192, 16384):
        band = report(f"doge_160m layer, T = {t}, keep_window_size = {args.keep}, band walk (before)", t=t,
                      keep=args.keep, sparse=False, **shape)
        walk = report(f"doge_160m layer, T = {t}, keep_window_size = {args.keep}, sparse walk", t=t, keep=args.keep,
                      sparse=True, **shape)
        print(f"  => sparse walk {band / walk:.2f}× faster than the band walk on the roofline")


if __name__ == "__main__":
    main()
