"""The Mosaic-TPU DMA kernels: forward, dQ and dK/dV/d-bias, wired through custom_vjp.

Layout (prepared by doge_jax.kernels.tpu_dma). A query tile is `block_q` positions × the R = N/K query heads of
one kv head, stacked head-major: local row r·block_q + u is head k·R + r at position i·block_q + u. So one K/V
tile serves the whole GQA group (K/V are never repeated), the bias of head r is a broadcast over a sublane-aligned
slab of block_q rows, and its gradient is that slab's column sum (no per-row selects, no atomics).

    q, do, o   [B, K, T_p·R, H_p]   bf16/fp32; rows as above, H_p = head dim padded to a multiple of 128 lanes
    k, v       [B, K, S_p, H_p]
    dt         [B, K, Gr, S_p]      fp32 additive bias; Gr = 1 (one per kv head) or R (one per query head)
    kpos       [B, 1, S_p]          int32 key position, NO_KEY for padding / kv_mask=False
    kseg       [B, 1, S_p]          int32 (packed segments only)
    qpos       [1, 1, T_p·R]        int32 query position of each row, −1 for the padding rows (they see nothing)
    qseg       [B, 1, T_p·R]        int32 (packed segments only)
    thr        [B, K, 1, T_p·R]     fp32 per-row top-k threshold (only when the top-k is active)
    lse, delta [B, K, 1, T_p·R]     fp32 (backward inputs)

Per-key vectors sit on lanes ([1, block_k] tiles), per-row vectors are stored lane-major too ([1, rows]: no 128×
broadcast copy in HBM) and turned into [rows, 1] columns in VMEM, as splash attention does for its logsumexp.
Scores are [rows, block_k] fp32 tiles: s = q·kᵀ·scale + dt, then the exact mask (causal, window, segments,
dt ≥ thr) decides which keys count; the online softmax keeps m and l lane-replicated in [rows, 128] scratch.

Grids, with the innermost axis walking a contiguous range of blocks given by scalar-prefetched tables (SMEM):
    forward, dQ:  (B, K, q tiles, kv_steps)   kv block = kv_lo[b, i] + min(j, kv_n[b, i] − 1)
    dK/dV/d-bias: (B, K, kv blocks, q_steps)  q tile   = q_lo[b, j] + min(i, q_n[b, j] − 1)
Steps past a range's end repeat its last block index, so Pallas issues no DMA for them, and `pl.when` skips
their compute: blocks wholly outside the causal band, the sliding window, or the kv_mask cost neither bandwidth
nor FLOPs (as splash attention's MaskInfo). Semantics: ("parallel",) × 3 + ("arbitrary",) for the walked axis.

TPU roofline, on paper (`python benchmarks/tpu_roofline.py` prints it for any shape). v5e: 197 TFLOP/s bf16 MXU,
819 GB/s HBM; FLOPs count matmuls only (2·m·n·k); a block is re-fetched only when its index changes. Per visited
(query tile, key block) pair, rows = block_q·R, bk = block_k, H_p the padded head dim, bf16 inputs:
    forward       2 matmuls (q·kᵀ, p·v)                 4·rows·bk·H_p FLOPs, reads the K/V tile (4·bk·H_p B)
    dQ            3 matmuls (q·kᵀ, do·vᵀ, ds·k)          6·rows·bk·H_p,       reads the K/V tile
    dK/dV/d-bias  4 matmuls (q·kᵀ, pᵀ·do, do·vᵀ, dsᵀ·q)  8·rows·bk·H_p,       reads the q/do tile (4·rows·H_p B)
At the default rows = bk = 512, H_p = 128: 134 / 201 / 268 MFLOP against 262 kB per pair, ≈ 500–1000 FLOP/B,
above v5e's ridge of 240 FLOP/B: every pass is MXU-bound.
doge_160m layer (N = 6, K = 3, R = 2, H = 128), one sequence, default tiles (256 positions × 2 heads, 512 keys):
    T = 2048 (= keep_window_size, no top-k): 20 of 32 pairs per kv head (the causal band at block granularity)
        forward 8.05 GFLOP / 28.6 MB → 41 µs;  dQ 12.1 GFLOP → 61 µs;  dK/dV 16.1 GFLOP → 82 µs
        fwd + bwd ≥ 184 µs per layer (≥ 4.4 ms for 24 layers); the exact causal triangle alone is 33 µs forward.
    T = 16384, keep_window_size = 2048: 1056 of 2048 pairs per kv head
        forward 425 GFLOP / 945 MB → 2.16 ms;  dQ 638 GFLOP → 3.24 ms;  dK/dV 850 GFLOP → 4.32 ms
        fwd + bwd ≥ 9.7 ms per layer. The top-k keeps 2048 keys per row, but the threshold is an elementwise test
        here, so the kernel walks the whole causal band: a forward over the kept keys alone would be 0.49 ms.
        Gathering them (the Triton kernel's sparse walk) is the next 4× at long context; not done here.
Not in these bounds, to be measured on the first TPU run: the elementwise mask / softmax work on the VPU and EUP
(≈ 12–15 vector ops and one exp per score, which at H = 128 may rival the MXU time), the fixed cost of each grid
step (288 steps per layer at T = 2048, the skipped ones included), and the XLA work around the kernels (layout
transposes, delta, top-k thresholds).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NO_KEY = 2**30  # position of a missing key: after every query, so the causal test drops it
NUM_LANES = 128
NUM_SUBLANES = 8
_NEG = -1e30  # running-max floor and masked score; exp(_NEG − m) underflows to 0 for any real score m


@dataclasses.dataclass(frozen=True)
class TpuKernelConfig:
    """Static description of one attention call (hashable: it keys the jit cache)."""

    scale: float
    block_q: int  # query positions per tile; a tile holds rows = block_q·heads_per_kv rows
    block_k: int  # keys per tile (a multiple of 128 lanes)
    heads_per_kv: int  # R
    bias_rows: int  # Gr: 1 or R
    sliding_window: int | None
    has_thr: bool
    has_segments: bool
    kv_steps: int  # static length of the walked kv axis of the forward and dQ grids
    q_steps: int  # static length of the walked q axis of the dK/dV grid
    fwd_pairs: int = 0  # (batch, q tile, kv block) triples the causal/window band visits, for the cost estimate
    dkv_pairs: int = 0
    interpret: Any = None  # None on TPU; a pltpu.InterpretParams elsewhere

    def __post_init__(self):
        for name in ("block_q", "block_k", "heads_per_kv", "kv_steps", "q_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.block_q % NUM_SUBLANES or self.rows % NUM_LANES:
            raise ValueError(f"block_q={self.block_q} must be a multiple of {NUM_SUBLANES} with "
                             f"block_q*heads_per_kv={self.rows} a multiple of {NUM_LANES}")
        if self.block_k % NUM_LANES:
            raise ValueError(f"block_k={self.block_k} must be a multiple of {NUM_LANES}")
        if self.bias_rows not in (1, self.heads_per_kv):
            raise ValueError(f"bias_rows={self.bias_rows} must be 1 or heads_per_kv={self.heads_per_kv}")

    @property
    def rows(self) -> int:
        return self.block_q * self.heads_per_kv


def _dot(a, b, contract_a: int, contract_b: int):
    """fp32-accumulated matmul; fp32 inputs at full precision (the reference's fp32 scores)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _lanes(x, n: int):
    """[rows, 128] lane-replicated → [rows, n] (n a multiple of 128)."""
    return x if n == NUM_LANES else jnp.tile(x, (1, n // NUM_LANES))


def _column(ref):
    """A [1, rows] lane-major block → [rows, 1]."""
    return jnp.expand_dims(ref[0], -1)


def _bias(cfg: TpuKernelConfig, dt_ref):
    """[1, bk] (shared by the group) or [rows, bk]: head r's bias row broadcast over its slab of block_q rows."""
    if cfg.bias_rows == 1:
        return dt_ref[...]
    dt = dt_ref[...]  # [R, bk]
    return jnp.broadcast_to(dt[:, None, :], (cfg.bias_rows, cfg.block_q, cfg.block_k)).reshape(
        cfg.rows, cfg.block_k)


def _scores(cfg: TpuKernelConfig, r, q, k):
    """(s, keep), both [rows, bk]: s = q·kᵀ·scale + dt (fp32), keep = MaskSpec.allowed ∧ top-k."""
    bias = _bias(cfg, r["dt"])
    s = _dot(q, k, 1, 1) * cfg.scale + bias
    qpos, kpos = _column(r["qpos"]), r["kpos"][...]  # [rows, 1], [1, bk]
    keep = kpos <= qpos
    if cfg.sliding_window is not None:
        keep &= kpos > qpos - cfg.sliding_window
    if cfg.has_segments:
        keep &= _column(r["qseg"]) == r["kseg"][...]
    if cfg.has_thr:
        keep &= bias >= _column(r["thr"])
    return s, keep


def _enabled(cfg: TpuKernelConfig, name: str) -> bool:
    if name == "thr":
        return cfg.has_thr
    if name in ("qseg", "kseg"):
        return cfg.has_segments
    return True


def _unpack(cfg: TpuKernelConfig, refs, names):
    """Names the refs of a kernel; absent optional operands are None."""
    refs = list(refs)
    out = {name: refs.pop(0) if _enabled(cfg, name) else None for name in names}
    assert not refs, refs
    return out


def _specs(cfg: TpuKernelConfig, head_dim: int, q_block, kv_block):
    """BlockSpecs by operand name; q_block / kv_block map (grid indices, tables) → the q tile / kv block index."""
    rows, bk = cfg.rows, cfg.block_k

    def at_q(index):
        return lambda b, h, x, y, *tables: index(b, h, q_block(b, x, y, *tables))

    def at_k(index):
        return lambda b, h, x, y, *tables: index(b, h, kv_block(b, x, y, *tables))

    return {
        "q": pl.BlockSpec((None, None, rows, head_dim), at_q(lambda b, h, i: (b, h, i, 0))),
        "row": pl.BlockSpec((None, None, 1, rows), at_q(lambda b, h, i: (b, h, 0, i))),  # thr, lse, delta
        "qpos": pl.BlockSpec((None, 1, rows), at_q(lambda b, h, i: (0, 0, i))),
        "qseg": pl.BlockSpec((None, 1, rows), at_q(lambda b, h, i: (b, 0, i))),
        "k": pl.BlockSpec((None, None, bk, head_dim), at_k(lambda b, h, j: (b, h, j, 0))),
        "dt": pl.BlockSpec((None, None, cfg.bias_rows, bk), at_k(lambda b, h, j: (b, h, 0, j))),
        "kpos": pl.BlockSpec((None, 1, bk), at_k(lambda b, h, j: (b, 0, j))),
    }


def _walk(lo_ref, n_ref, outer: int, b, x, y):
    """Block index of walk step y of outer tile x: lo + min(y, n − 1) (n = 0: lo, never computed on)."""
    idx = b * outer + x
    return lo_ref[idx] + jnp.minimum(y, jnp.maximum(n_ref[idx] - 1, 0))


_VMEM_LIMIT = 48 * 2**20  # above v5e's 16 MiB default scope: dK/dV at 512×512 tiles, H_p = 256, fp32 needs ≈ 12 MiB


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=_VMEM_LIMIT)


def _present(cfg: TpuKernelConfig, operands):
    """(array, BlockSpec) of the operands this config passes, in kernel order."""
    return [(a, s) for name, a, s in operands if _enabled(cfg, name)]


def _cost(cfg: TpuKernelConfig, pairs: int, head_dim: int, matmuls: int, operands, outputs):
    """XLA's scheduling hint: MXU FLOPs of the visited (tile, block) pairs, exps, and the bytes of every operand."""
    flops = 2 * matmuls * pairs * cfg.rows * cfg.block_k * head_dim
    nbytes = sum(a.size * a.dtype.itemsize for a in operands) + sum(
        s.size * jnp.dtype(s.dtype).itemsize for s in outputs)
    return pl.CostEstimate(flops=flops, transcendentals=pairs * cfg.rows * cfg.block_k, bytes_accessed=nbytes)


# --- forward ---------------------------------------------------------------------------------------------------

def _fwd_kernel(kv_lo_ref, kv_n_ref, *refs, cfg: TpuKernelConfig):
    r = _unpack(cfg, refs, ["q", "k", "v", "dt", "kpos", "qpos", "thr", "qseg", "kseg", "o", "lse",
                            "m_scr", "l_scr", "acc_scr"])
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    n_visit = kv_n_ref[b * pl.num_programs(2) + i]

    @pl.when(j == 0)
    def _init():
        r["m_scr"][...] = jnp.full(r["m_scr"].shape, _NEG, jnp.float32)
        r["l_scr"][...] = jnp.zeros(r["l_scr"].shape, jnp.float32)
        r["acc_scr"][...] = jnp.zeros(r["acc_scr"].shape, jnp.float32)

    @pl.when(j < n_visit)
    def _step():
        v = r["v"][...]  # [bk, H_p]
        s, keep = _scores(cfg, r, r["q"][...], r["k"][...])  # [rows, bk]
        s = jnp.where(keep, s, _NEG)
        m_prev, l_prev = r["m_scr"][...], r["l_scr"][...]  # [rows, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(keep, jnp.exp(s - _lanes(m_next, cfg.block_k)), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        r["l_scr"][...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        r["m_scr"][...] = m_next
        pv = _dot(p.astype(v.dtype), v, 1, 0)  # [rows, H_p]
        r["acc_scr"][...] = r["acc_scr"][...] * _lanes(alpha, pv.shape[1]) + pv

    @pl.when(j == cfg.kv_steps - 1)
    def _finish():
        denom = r["l_scr"][...]
        empty = denom == 0.0  # no allowed key: the wrapper substitutes the reference's uniform row
        safe = jnp.where(empty, 1.0, denom)
        acc = r["acc_scr"][...]
        r["o"][...] = (acc / _lanes(safe, acc.shape[1])).astype(r["o"].dtype)
        r["lse"][...] = jnp.where(empty, -jnp.inf, r["m_scr"][...] + jnp.log(safe))


def _forward(cfg: TpuKernelConfig, q, k, v, dt, meta):
    """(o [B, K, T_p·R, H_p], lse [B, K, T_p·R]); lse = −inf on rows with no kept key."""
    b, kh, n_rows, head_dim = q.shape
    n_tiles = n_rows // cfg.rows
    walk = functools.partial(_walk, outer=n_tiles)
    spec = _specs(cfg, head_dim, q_block=lambda b_, i, j, *t: i,
                  kv_block=lambda b_, i, j, lo, n: walk(lo, n, b=b_, x=i, y=j))
    operands = _present(cfg, [
        ("q", q, spec["q"]), ("k", k, spec["k"]), ("v", v, spec["k"]), ("dt", dt, spec["dt"]),
        ("kpos", meta["kpos"], spec["kpos"]), ("qpos", meta["qpos"], spec["qpos"]),
        ("thr", meta.get("thr"), spec["row"]), ("qseg", meta.get("qseg"), spec["qseg"]),
        ("kseg", meta.get("kseg"), spec["kpos"])])
    out_specs = [spec["q"], pl.BlockSpec((None, None, cfg.rows, NUM_LANES), lambda b_, h, i, j, *t: (b_, h, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, kh, n_rows, NUM_LANES), jnp.float32)]  # lse, lane-replicated
    arrays = [a for a, _ in operands]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, n_tiles, cfg.kv_steps),
            in_specs=[s for _, s in operands],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((cfg.rows, NUM_LANES), jnp.float32),
                            pltpu.VMEM((cfg.rows, NUM_LANES), jnp.float32),
                            pltpu.VMEM((cfg.rows, head_dim), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=_compiler_params(),
        cost_estimate=_cost(cfg, cfg.fwd_pairs * kh, head_dim, 2, arrays, out_shape),
        interpret=cfg.interpret or False,
        name="dma_tpu_forward",
    )(meta["kv_lo"], meta["kv_n"], *arrays)
    return o, lse[..., 0]


# --- backward: dQ ----------------------------------------------------------------------------------------------

def _dq_kernel(kv_lo_ref, kv_n_ref, *refs, cfg: TpuKernelConfig):
    r = _unpack(cfg, refs, ["q", "do", "lse", "delta", "k", "v", "dt", "kpos", "qpos", "thr", "qseg", "kseg",
                            "dq", "dq_scr"])
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    n_visit = kv_n_ref[b * pl.num_programs(2) + i]

    @pl.when(j == 0)
    def _init():
        r["dq_scr"][...] = jnp.zeros(r["dq_scr"].shape, jnp.float32)

    @pl.when(j < n_visit)
    def _step():
        k, v = r["k"][...], r["v"][...]
        s, keep = _scores(cfg, r, r["q"][...], k)
        p = jnp.where(keep, jnp.exp(s - _column(r["lse"])), 0.0)  # [rows, bk]
        dp = _dot(r["do"][...], v, 1, 1)
        ds = p * (dp - _column(r["delta"]))  # d(score) = d(bias)
        r["dq_scr"][...] += _dot(ds.astype(k.dtype), k, 1, 0)

    @pl.when(j == cfg.kv_steps - 1)
    def _finish():
        r["dq"][...] = (r["dq_scr"][...] * cfg.scale).astype(r["dq"].dtype)


def _backward_dq(cfg: TpuKernelConfig, q, k, v, dt, meta, do, lse, delta):
    b, kh, n_rows, head_dim = q.shape
    n_tiles = n_rows // cfg.rows
    walk = functools.partial(_walk, outer=n_tiles)
    spec = _specs(cfg, head_dim, q_block=lambda b_, i, j, *t: i,
                  kv_block=lambda b_, i, j, lo, n: walk(lo, n, b=b_, x=i, y=j))
    operands = _present(cfg, [
        ("q", q, spec["q"]), ("do", do, spec["q"]), ("lse", lse, spec["row"]), ("delta", delta, spec["row"]),
        ("k", k, spec["k"]), ("v", v, spec["k"]), ("dt", dt, spec["dt"]), ("kpos", meta["kpos"], spec["kpos"]),
        ("qpos", meta["qpos"], spec["qpos"]), ("thr", meta.get("thr"), spec["row"]),
        ("qseg", meta.get("qseg"), spec["qseg"]), ("kseg", meta.get("kseg"), spec["kpos"])])
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    arrays = [a for a, _ in operands]
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, n_tiles, cfg.kv_steps),
            in_specs=[s for _, s in operands],
            out_specs=spec["q"],
            scratch_shapes=[pltpu.VMEM((cfg.rows, head_dim), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=_compiler_params(),
        cost_estimate=_cost(cfg, cfg.fwd_pairs * kh, head_dim, 3, arrays, [out_shape]),
        interpret=cfg.interpret or False,
        name="dma_tpu_backward_dq",
    )(meta["kv_lo"], meta["kv_n"], *arrays)


# --- backward: dK, dV, d-bias ----------------------------------------------------------------------------------

def _dkv_kernel(q_lo_ref, q_n_ref, *refs, cfg: TpuKernelConfig):
    r = _unpack(cfg, refs, ["k", "v", "dt", "kpos", "kseg", "q", "do", "lse", "delta", "qpos", "thr", "qseg",
                            "dk", "dv", "ddt", "dk_scr", "dv_scr", "ddt_scr"])
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    n_visit = q_n_ref[b * pl.num_programs(2) + j]

    @pl.when(i == 0)
    def _init():
        for name in ("dk_scr", "dv_scr", "ddt_scr"):
            r[name][...] = jnp.zeros(r[name].shape, jnp.float32)

    @pl.when(i < n_visit)
    def _step():
        q, do = r["q"][...], r["do"][...]  # [rows, H_p]
        s, keep = _scores(cfg, r, q, r["k"][...])
        p = jnp.where(keep, jnp.exp(s - _column(r["lse"])), 0.0)  # [rows, bk]
        r["dv_scr"][...] += _dot(p.astype(do.dtype), do, 0, 0)  # pᵀ·do: [bk, H_p]
        ds = p * (_dot(do, r["v"][...], 1, 1) - _column(r["delta"]))
        r["dk_scr"][...] += _dot(ds.astype(q.dtype), q, 0, 0)  # dsᵀ·q
        if cfg.bias_rows == 1:
            r["ddt_scr"][...] += jnp.sum(ds, axis=0, keepdims=True)  # [1, bk]
        else:  # head r's bias gradient: the column sum of its slab
            r["ddt_scr"][...] += jnp.sum(ds.reshape(cfg.bias_rows, cfg.block_q, cfg.block_k), axis=1)

    @pl.when(i == cfg.q_steps - 1)
    def _finish():
        r["dk"][...] = (r["dk_scr"][...] * cfg.scale).astype(r["dk"].dtype)
        r["dv"][...] = r["dv_scr"][...].astype(r["dv"].dtype)
        r["ddt"][...] = r["ddt_scr"][...]


def _backward_dkv(cfg: TpuKernelConfig, q, k, v, dt, meta, do, lse, delta):
    b, kh, n_keys, head_dim = k.shape
    n_blocks = n_keys // cfg.block_k
    walk = functools.partial(_walk, outer=n_blocks)
    spec = _specs(cfg, head_dim, q_block=lambda b_, j, i, lo, n: walk(lo, n, b=b_, x=j, y=i),
                  kv_block=lambda b_, j, i, *t: j)
    operands = _present(cfg, [
        ("k", k, spec["k"]), ("v", v, spec["k"]), ("dt", dt, spec["dt"]), ("kpos", meta["kpos"], spec["kpos"]),
        ("kseg", meta.get("kseg"), spec["kpos"]), ("q", q, spec["q"]), ("do", do, spec["q"]),
        ("lse", lse, spec["row"]), ("delta", delta, spec["row"]), ("qpos", meta["qpos"], spec["qpos"]),
        ("thr", meta.get("thr"), spec["row"]), ("qseg", meta.get("qseg"), spec["qseg"])])
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(dt.shape, jnp.float32)]
    arrays = [a for a, _ in operands]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, n_blocks, cfg.q_steps),
            in_specs=[s for _, s in operands],
            out_specs=[spec["k"], spec["k"], spec["dt"]],
            scratch_shapes=[pltpu.VMEM((cfg.block_k, head_dim), jnp.float32),
                            pltpu.VMEM((cfg.block_k, head_dim), jnp.float32),
                            pltpu.VMEM((cfg.bias_rows, cfg.block_k), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=_compiler_params(),
        cost_estimate=_cost(cfg, cfg.dkv_pairs * kh, head_dim, 4, arrays, out_shape),
        interpret=cfg.interpret or False,
        name="dma_tpu_backward_dkv",
    )(meta["q_lo"], meta["q_n"], *arrays)


# --- custom_vjp ------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_dma(cfg: TpuKernelConfig, q, k, v, dt, meta):
    """(o, lse) of DMA in the kernel layout (module docstring). meta: kpos, qpos, the block tables (kv_lo, kv_n,
    q_lo, q_n: int32 [B·tiles]) and thr / qseg / kseg as configured.

    lse is −inf on rows with no kept key (their o is 0). Only q, k, v and dt are differentiated.
    """
    return _forward(cfg, q, k, v, dt, meta)


def _flash_fwd(cfg, q, k, v, dt, meta):
    o, lse = _forward(cfg, q, k, v, dt, meta)
    return (o, lse), (q, k, v, dt, meta, o, lse)


def _flash_bwd(cfg, res, cotangents):
    q, k, v, dt, meta, o, lse = res
    do, _ = cotangents  # lse only ever feeds a comparison: its cotangent is zero
    do = do.astype(q.dtype)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B, K, 1, T_p·R]
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)[:, :, None, :]  # empty rows keep no key: avoid inf arithmetic
    dq = _backward_dq(cfg, q, k, v, dt, meta, do, lse, delta)
    dk, dv, ddt = _backward_dkv(cfg, q, k, v, dt, meta, do, lse, delta)
    return dq, dk, dv, ddt.astype(dt.dtype), None


flash_dma.defvjp(_flash_fwd, _flash_bwd)
