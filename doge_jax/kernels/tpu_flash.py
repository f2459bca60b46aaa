"""The Mosaic-TPU DMA kernels: forward, dQ and dK/dV/d-bias, wired through custom_vjp.

Layout (prepared by doge_jax.kernels.tpu_dma). A query tile is `block_q` positions × the R = N/K query heads of
one kv head, stacked head-major: local row r·block_q + u is head k·R + r at position i·block_q + u. So one K/V
tile serves the whole GQA group (K/V are never repeated), the bias of head r is a broadcast over a sublane-aligned
slab of block_q rows, and its gradient is that slab's column sum (no per-row selects, no atomics).

    q, do, o   [B, K, T_p·R, H_p]   bf16/fp32; rows as above, H_p = head dim padded to a multiple of 128 lanes
    k, v       [B, K, S_p, H_p]     in walk order (positions, or the sparse walk's permutation of each kv head)
    dt         [B, K, Gr, S_p]      fp32 additive bias; Gr = 1 (one per kv head) or R (one per query head)
    kpos       [B, K, 1, S_p]       int32 key position, NO_KEY for padding / kv_mask=False
    kseg       [B, K, 1, S_p]       int32 (packed segments only)
    qpos       [1, 1, T_p·R]        int32 query position of each row, −1 for the padding rows (they see nothing)
    qseg       [B, 1, T_p·R]        int32 (packed segments only)
    thr        [B, K, 1, T_p·R]     fp32 per-row top-k threshold (only when the top-k is active)
    lse, delta [B, K, 1, T_p·R]     fp32 (backward inputs)

Per-key vectors sit on lanes ([1, block_k] tiles), per-row vectors are stored lane-major too ([1, rows]: no 128×
broadcast copy in HBM) and turned into [rows, 1] columns in VMEM, as splash attention does for its logsumexp.
Scores are [rows, block_k] fp32 tiles: s = q·kᵀ·scale + dt, then the exact mask (causal, window, segments,
dt ≥ thr) decides which keys count; the online softmax keeps m and l lane-replicated in [rows, 128] scratch.

Grids: one program per tile of the fixed side, every axis "parallel". The walked side stays in HBM
(memory_space=ANY) and each program copies its blocks into two VMEM slots by hand, block j + 1 in flight while
block j is computed on, following tables scalar-prefetched into SMEM:
    forward, dQ:  (B, K, q tiles)     key blocks r·run_stride + run_lo + u, u < run_n, for each of the tile's runs r
    dK/dV/d-bias: (B, K, key blocks)  query tiles q_lo + u, u < q_n
Band walk (no top-k, or S < 4·keep_window_size): one run per tile, the causal band and window narrowed to the
blocks holding valid keys. Sparse walk (long context; tpu_dma and topk.walk_plan): the keys of each kv head are
permuted inside chunks so that the blocks a tile needs are a prefix of every chunk (one run per chunk) and the
tiles a block serves a contiguous range. Both walks visit the same (tile, block) pairs. How many blocks a sparse
walk visits depends on dt, and a grid axis is static: sized for the worst case (every key tied with the
threshold, as at initialisation) it would pay a grid step, ~0.35 µs, for each skipped block, more than the compute
of a 128-key block. Hence the hand-written copies.

TPU roofline, on paper (`python benchmarks/tpu_roofline.py` prints it for any shape). v5e: 197 TFLOP/s bf16 MXU,
819 GB/s HBM; FLOPs count matmuls only (2·m·n·k); each visited pair copies its walked block once. Per visited
(query tile, key block) pair, rows = block_q·R, bk = block_k, H_p the padded head dim, bf16 inputs:
    forward       2 matmuls (q·kᵀ, p·v)                 4·rows·bk·H_p FLOPs, reads the K/V block (4·bk·H_p B)
    dQ            3 matmuls (q·kᵀ, do·vᵀ, ds·k)          6·rows·bk·H_p,       reads the K/V block
    dK/dV/d-bias  4 matmuls (q·kᵀ, pᵀ·do, do·vᵀ, dsᵀ·q)  8·rows·bk·H_p,       reads the q/do tile (4·rows·H_p B)
At rows = bk = 512, H_p = 128 (the band walk's tiles): 134 / 201 / 268 MFLOP against 262 kB per pair, ≈ 500–1000
FLOP/B, above v5e's ridge of 240 FLOP/B: every pass is MXU-bound. The sparse walk's 128-key blocks leave dK/dV at
≈ 256 FLOP/B, on the ridge (the q/do tile is read again for every block).
doge_160m layer (N = 6, K = 3, R = 2, H = 128), one sequence, 256 positions × 2 heads per tile:
    T = 2048 (= keep_window_size, no top-k), band walk, 512-key blocks: 20 of 32 pairs per kv head
        forward 8.05 GFLOP / 28.6 MB → 41 µs;  dQ 12.1 GFLOP → 61 µs;  dK/dV 16.1 GFLOP → 82 µs
        fwd + bwd ≥ 184 µs per layer (≥ 4.4 ms for 24 layers); the exact causal triangle alone is 33 µs forward.
    T = 16384, keep_window_size = 2048, random normal dt:
        band walk, 512-key blocks: 1056 of 2048 pairs per kv head; forward 2.16 ms, dQ 3.24, dK/dV 4.32:
        fwd + bwd ≥ 9.7 ms, while a forward over the kept keys alone would be 0.49 ms.
        sparse walk, 128-key blocks, chunks of 2048 keys: 1313 of 8192 pairs per kv head, 1.015× the blocks that
        hold a kept key; forward 0.67 ms, dQ 1.01, dK/dV 1.36 (HBM-bound): fwd + bwd ≥ 3.04 ms, 3.2× the band walk.
        At T = 8192: 2.50 → 1.40 ms (1.8×, 1.011× the blocks holding kept keys); at T = 4096: 0.66 → 0.58 ms
        (1.1×), so the sparse walk is the default from S = 4·keep_window_size.
Compiled for real chips from a CPU host (`benchmarks/tpu_roofline.py --compile v5e:2x2,v6e:2x2,v5p:2x2x1`, jax 0.11.2,
libtpu 0.0.48.1), the same doge_160m layer in bf16. Scoped VMEM (the smallest limit each kernel compiles under),
v5e / v6e / v5p: band walk, 512-key blocks: forward 3.5 / 3.3 / 4.1 MiB, dQ 2.8 / 3.1 / 2.7, dK/dV 3.3 / 3.3 / 3.4;
sparse walk, 128-key blocks: forward 2.4 / 2.3 / 2.9, dQ 1.9 / 1.6 / 1.9, dK/dV 1.4 / 1.5 / 1.4. The layer's
fwd + bwd compiles in 5 / 3 / 4 s at T = 2048 and 36 / 58 / 40 s at T = 16384, where XLA's sorts dominate: on v5e
the thresholds' prefix sort alone takes ≈ 20 s, the band walk's layer ≈ 26 s, the sparse walk's ≈ 38 s (a busy
2-core host; times vary by 2× with its load).
Not in these bounds, to be measured on the first TPU run: the elementwise mask / softmax work on the VPU and EUP
(≈ 12–15 vector ops and one exp per score, which at H = 128 may rival the MXU time), the fixed cost of each
program and walk step (the first block of each program is not prefetched while the previous program runs), and
the XLA work around the kernels (layout transposes, delta, top-k thresholds, the walk plan and the key
permutation).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from doge_jax.kernels import shared as _shared

NO_KEY = 2**30  # position of a missing key: after every query, so the causal test drops it
NUM_LANES = 128
NUM_SUBLANES = 8
_NEG = -1e30  # running-max floor and masked score; exp(_NEG − m) underflows to 0 for any real score m


@dataclasses.dataclass(frozen=True)
class TpuKernelConfig:
    """Static description of one attention call (hashable: it keys the jit cache)."""

    scale: float
    block_q: int  # query positions per tile; a tile holds rows = block_q·heads_per_kv rows
    block_k: int  # keys per block (a multiple of 128 lanes)
    heads_per_kv: int  # R
    bias_rows: int  # Gr: 1 or R
    sliding_window: int | None
    has_thr: bool
    has_segments: bool
    kv_runs: int = 1  # runs per query tile in the forward/dQ walk tables: 1 (band walk) or the chunks (sparse walk)
    run_stride: int = 0  # key blocks between the starts of consecutive runs (blocks per chunk)
    fwd_pairs: int = 0  # (batch, q tile, kv block) triples a walk may visit, for XLA's cost estimate
    dkv_pairs: int = 0
    interpret: Any = None  # None on TPU; a pltpu.InterpretParams elsewhere

    def __post_init__(self):
        for name in ("block_q", "block_k", "heads_per_kv", "kv_runs"):
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


def _column(x):
    """A [1, rows] lane-major row vector → [rows, 1]."""
    return jnp.expand_dims(x[0], -1)


def _bias(cfg: TpuKernelConfig, dt):
    """dt [Gr, bk] → [1, bk] (shared by the group) or [rows, bk]: head r's row over its slab of block_q rows."""
    if cfg.bias_rows == 1:
        return dt
    return jnp.broadcast_to(dt[:, None, :], (cfg.bias_rows, cfg.block_q, cfg.block_k)).reshape(cfg.rows, cfg.block_k)


def _scores(cfg: TpuKernelConfig, x):
    """(s, keep), both [rows, bk]: s = q·kᵀ·scale + dt (fp32), keep = MaskSpec.allowed ∧ top-k.

    x: the values of one (query tile, key block) pair by operand name; per-row vectors as [1, rows]."""
    bias = _bias(cfg, x["dt"])
    s = _dot(x["q"], x["k"], 1, 1) * cfg.scale + bias
    qpos, kpos = _column(x["qpos"]), x["kpos"]  # [rows, 1], [1, bk]
    keep = kpos <= qpos
    if cfg.sliding_window is not None:
        keep &= kpos > qpos - cfg.sliding_window
    if cfg.has_segments:
        keep &= _column(x["qseg"]) == x["kseg"]
    if cfg.has_thr:
        keep &= bias >= _column(x["thr"])
    return s, keep


def _enabled(cfg: TpuKernelConfig, name: str) -> bool:
    name = name.removesuffix("_buf")
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


# --- the walked side: one block per step, copied from HBM by hand --------------------------------------------------
#
# The number of blocks a tile walks depends on dt (the sparse walk), and a grid axis cannot: a grid sized for the
# worst case (the causal band) would pay a grid step for every block skipped. So the walked operands stay in HBM
# (memory_space=ANY) and each program copies the blocks of its list into a pair of VMEM slots, block j + 1 in flight
# while block j is computed on.

@dataclasses.dataclass(frozen=True)
class _Walked:
    """One walked operand: its name, the VMEM block it arrives in, and the HBM view of block `index`."""

    name: str
    block: tuple[int, ...]
    view: Callable  # (ref, b, h, index) -> the HBM ref view


def _key_side(cfg: TpuKernelConfig, head_dim: int) -> list[_Walked]:
    """k, v [B, K, S_p, H_p]; dt [B, K, Gr, S_p]; kpos, kseg [B, K, 1, S_p]: key block j."""
    bk = cfg.block_k

    def keys(j):
        return pl.ds(pl.multiple_of(j * bk, bk), bk)

    matrix = lambda ref, b, h, j: ref.at[b, h, keys(j), :]  # noqa: E731
    lanes = lambda ref, b, h, j: ref.at[b, h, :, keys(j)]  # noqa: E731
    return [_Walked("k", (bk, head_dim), matrix), _Walked("v", (bk, head_dim), matrix),
            _Walked("dt", (cfg.bias_rows, bk), lanes), _Walked("kpos", (1, bk), lanes),
            _Walked("kseg", (1, bk), lanes)]


def _query_side(cfg: TpuKernelConfig, head_dim: int) -> list[_Walked]:
    """q, do [B, K, T_p·R, H_p]; lse, delta, thr [B, K, 1, T_p·R]; qpos [1, 1, T_p·R]; qseg [B, 1, T_p·R]: tile i."""
    rows = cfg.rows

    def tile(i):
        return pl.ds(pl.multiple_of(i * rows, rows), rows)

    matrix = lambda ref, b, h, i: ref.at[b, h, tile(i), :]  # noqa: E731
    lanes = lambda ref, b, h, i: ref.at[b, h, :, tile(i)]  # noqa: E731
    return [_Walked("q", (rows, head_dim), matrix), _Walked("do", (rows, head_dim), matrix),
            _Walked("lse", (1, rows), lanes), _Walked("delta", (1, rows), lanes),
            _Walked("qpos", (1, rows), lambda ref, b, h, i: ref.at[0, :, tile(i)]),
            _Walked("thr", (1, rows), lanes), _Walked("qseg", (1, rows), lambda ref, b, h, i: ref.at[b, :, tile(i)])]


def _walk_scratch(cfg: TpuKernelConfig, walked: list[_Walked], arrays: dict):
    """Two VMEM slots per walked operand, then the DMA semaphores (one per operand and slot)."""
    present = [w for w in walked if _enabled(cfg, w.name)]
    return [pltpu.VMEM((2, *w.block), arrays[w.name].dtype) for w in present] + [
        pltpu.SemaphoreType.DMA((len(present), 2))]


class _Stream:
    """Copies of the walked operands' block `index` into VMEM slot 0 or 1."""

    def __init__(self, cfg: TpuKernelConfig, walked: list[_Walked], r: dict, b, h):
        self.present = [w for w in walked if _enabled(cfg, w.name)]
        self.r, self.b, self.h = r, b, h

    def _copies(self, slot, index):
        return [pltpu.make_async_copy(w.view(self.r[w.name], self.b, self.h, index), self.r[f"{w.name}_buf"].at[slot],
                                      self.r["sem"].at[n, slot]) for n, w in enumerate(self.present)]

    def start(self, slot, index):
        for copy in self._copies(slot, index):
            copy.start()

    def wait(self, slot, index):
        for copy in self._copies(slot, index):
            copy.wait()

    def values(self, slot) -> dict:
        return {w.name: self.r[f"{w.name}_buf"][slot] for w in self.present}


def _walk(lo_ref, n_ref, base, n_runs: int, stride: int, stream: _Stream, visit):
    """visit(values of the walked block) for each block r·stride + lo[base + r] + u, u < n[base + r], r < n_runs:
    the runs of one program's walk, read from SMEM. Empty runs are skipped; the next block's copy is started before
    the current one is computed on."""

    def length(r):
        return n_ref[base + jnp.minimum(r, n_runs - 1)]

    def block(r, u):
        return r * stride + lo_ref[base + r] + u

    def next_run(r):  # the first run ≥ r with a block, or n_runs
        return lax.while_loop(lambda r: (r < n_runs) & (length(r) == 0), lambda r: r + 1, r)

    first = next_run(jnp.int32(0))

    @pl.when(first < n_runs)
    def _prefetch():
        stream.start(0, block(first, 0))

    def step(carry):
        r, u, slot = carry
        more = u + 1 < length(r)
        r_next = jnp.where(more, r, next_run(r + 1))
        u_next = jnp.where(more, u + 1, 0)

        @pl.when(r_next < n_runs)
        def _prefetch_next():
            stream.start(1 - slot, block(r_next, u_next))

        stream.wait(slot, block(r, u))
        visit(stream.values(slot))
        return r_next, u_next, 1 - slot

    lax.while_loop(lambda carry: carry[0] < n_runs, step, (first, jnp.int32(0), jnp.int32(0)))


def _program_base(n_runs: int):
    """Index of this program's first run in the flattened [B, K, outer, n_runs] tables."""
    b, h, x = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    return ((b * pl.num_programs(1) + h) * pl.num_programs(2) + x) * n_runs


_VMEM_LIMIT = 48 * 2**20  # above v5e's 16 MiB default scope: dK/dV at 512×512 tiles, H_p = 256, fp32 needs ≈ 12 MiB


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"),
                                vmem_limit_bytes=_VMEM_LIMIT)


def _cost(cfg: TpuKernelConfig, pairs: int, head_dim: int, matmuls: int, operands, outputs):
    """XLA's scheduling hint: MXU FLOPs of the pairs a walk may visit, exps, and the bytes of every operand."""
    flops = 2 * matmuls * pairs * cfg.rows * cfg.block_k * head_dim
    nbytes = sum(a.size * a.dtype.itemsize for a in operands) + sum(
        s.size * jnp.dtype(s.dtype).itemsize for s in outputs)
    return pl.CostEstimate(flops=flops, transcendentals=pairs * cfg.rows * cfg.block_k, bytes_accessed=nbytes)


def _tile_specs(cfg: TpuKernelConfig, head_dim: int):
    """BlockSpecs of the fixed side of the forward/dQ grids (B, K, q tiles): tile i of each row operand."""
    rows = cfg.rows
    return {
        "q": pl.BlockSpec((None, None, rows, head_dim), lambda b, h, i, *_: (b, h, i, 0)),
        "row": pl.BlockSpec((None, None, 1, rows), lambda b, h, i, *_: (b, h, 0, i)),  # thr, lse, delta
        "qpos": pl.BlockSpec((None, 1, rows), lambda b, h, i, *_: (0, 0, i)),
        "qseg": pl.BlockSpec((None, 1, rows), lambda b, h, i, *_: (b, 0, i)),
    }


def _block_specs(cfg: TpuKernelConfig, head_dim: int):
    """BlockSpecs of the fixed side of the dK/dV grid (B, K, key blocks): block j of each key operand."""
    bk = cfg.block_k
    return {
        "k": pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, *_: (b, h, j, 0)),
        "dt": pl.BlockSpec((None, None, cfg.bias_rows, bk), lambda b, h, j, *_: (b, h, 0, j)),
        "kpos": pl.BlockSpec((None, None, 1, bk), lambda b, h, j, *_: (b, h, 0, j)),
    }


_HBM = pl.BlockSpec(memory_space=pl.ANY)


def _call(cfg: TpuKernelConfig, kernel, name: str, *, grid, tables, operands, out_specs, out_shape, scratch,
          pairs: int, matmuls: int, head_dim: int):
    """pallas_call with the two walk tables scalar-prefetched; operands: (name, array, BlockSpec) in kernel order."""
    present = [(a, spec) for n, a, spec in operands if _enabled(cfg, n)]
    arrays = [a for a, _ in present]
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=grid, in_specs=[spec for _, spec in present], out_specs=out_specs,
            scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=_compiler_params(),
        cost_estimate=_cost(cfg, pairs, head_dim, matmuls, arrays,
                            out_shape if isinstance(out_shape, list) else [out_shape]),
        interpret=cfg.interpret or False,
        name=name,
    )(*tables, *arrays)


# --- forward ---------------------------------------------------------------------------------------------------

_FWD_NAMES = ["q", "qpos", "thr", "qseg", "k", "v", "dt", "kpos", "kseg", "o", "lse", "m_scr", "l_scr", "acc_scr",
              "k_buf", "v_buf", "dt_buf", "kpos_buf", "kseg_buf", "sem"]


def _fwd_kernel(run_lo_ref, run_n_ref, *refs, cfg: TpuKernelConfig):
    r = _unpack(cfg, refs, _FWD_NAMES)
    b, h = pl.program_id(0), pl.program_id(1)
    r["m_scr"][...] = jnp.full(r["m_scr"].shape, _NEG, jnp.float32)
    r["l_scr"][...] = jnp.zeros(r["l_scr"].shape, jnp.float32)
    r["acc_scr"][...] = jnp.zeros(r["acc_scr"].shape, jnp.float32)

    def visit(x):
        x.update({name: r[name][...] for name in ("q", "qpos", "thr", "qseg") if r[name] is not None})
        s, keep = _scores(cfg, x)  # [rows, bk]
        s = jnp.where(keep, s, _NEG)
        m_prev, l_prev = r["m_scr"][...], r["l_scr"][...]  # [rows, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(keep, jnp.exp(s - _lanes(m_next, cfg.block_k)), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        r["l_scr"][...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        r["m_scr"][...] = m_next
        v = x["v"]  # [bk, H_p]
        pv = _dot(p.astype(v.dtype), v, 1, 0)  # [rows, H_p]
        r["acc_scr"][...] = r["acc_scr"][...] * _lanes(alpha, pv.shape[1]) + pv

    head_dim = r["q"].shape[-1]
    stream = _Stream(cfg, _key_side(cfg, head_dim), r, b, h)
    _walk(run_lo_ref, run_n_ref, _program_base(cfg.kv_runs), cfg.kv_runs, cfg.run_stride, stream, visit)

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
    spec = _tile_specs(cfg, head_dim)
    walked = {"k": k, "v": v, "dt": dt, "kpos": meta["kpos"], "kseg": meta.get("kseg")}
    operands = [("q", q, spec["q"]), ("qpos", meta["qpos"], spec["qpos"]), ("thr", meta.get("thr"), spec["row"]),
                ("qseg", meta.get("qseg"), spec["qseg"])] + [(n, a, _HBM) for n, a in walked.items()]
    out_shape = [jax.ShapeDtypeStruct(q.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, kh, n_rows, NUM_LANES), jnp.float32)]  # lse, lane-replicated
    scratch = [pltpu.VMEM((cfg.rows, NUM_LANES), jnp.float32), pltpu.VMEM((cfg.rows, NUM_LANES), jnp.float32),
               pltpu.VMEM((cfg.rows, head_dim), jnp.float32)] + _walk_scratch(cfg, _key_side(cfg, head_dim), walked)
    o, lse = _call(cfg, _fwd_kernel, "dma_tpu_forward", grid=(b, kh, n_tiles),
                   tables=(meta["run_lo"], meta["run_n"]), operands=operands,
                   out_specs=[spec["q"], pl.BlockSpec((None, None, cfg.rows, NUM_LANES),
                                                      lambda b_, h, i, *_: (b_, h, i, 0))],
                   out_shape=out_shape, scratch=scratch, pairs=cfg.fwd_pairs * kh, matmuls=2, head_dim=head_dim)
    return o, lse[..., 0]


# --- backward: dQ ----------------------------------------------------------------------------------------------

_DQ_NAMES = ["q", "do", "lse", "delta", "qpos", "thr", "qseg", "k", "v", "dt", "kpos", "kseg", "dq", "dq_scr",
             "k_buf", "v_buf", "dt_buf", "kpos_buf", "kseg_buf", "sem"]


def _dq_kernel(run_lo_ref, run_n_ref, *refs, cfg: TpuKernelConfig):
    r = _unpack(cfg, refs, _DQ_NAMES)
    b, h = pl.program_id(0), pl.program_id(1)
    r["dq_scr"][...] = jnp.zeros(r["dq_scr"].shape, jnp.float32)

    def visit(x):
        x.update({name: r[name][...] for name in ("q", "qpos", "thr", "qseg") if r[name] is not None})
        k = x["k"]
        s, keep = _scores(cfg, x)
        p = jnp.where(keep, jnp.exp(s - _column(r["lse"][...])), 0.0)  # [rows, bk]
        dp = _dot(r["do"][...], x["v"], 1, 1)
        ds = p * (dp - _column(r["delta"][...]))  # d(score) = d(bias)
        r["dq_scr"][...] += _dot(ds.astype(k.dtype), k, 1, 0)

    head_dim = r["q"].shape[-1]
    stream = _Stream(cfg, _key_side(cfg, head_dim), r, b, h)
    _walk(run_lo_ref, run_n_ref, _program_base(cfg.kv_runs), cfg.kv_runs, cfg.run_stride, stream, visit)
    r["dq"][...] = (r["dq_scr"][...] * cfg.scale).astype(r["dq"].dtype)


def _backward_dq(cfg: TpuKernelConfig, q, k, v, dt, meta, do, lse, delta):
    b, kh, n_rows, head_dim = q.shape
    spec = _tile_specs(cfg, head_dim)
    walked = {"k": k, "v": v, "dt": dt, "kpos": meta["kpos"], "kseg": meta.get("kseg")}
    operands = [("q", q, spec["q"]), ("do", do, spec["q"]), ("lse", lse, spec["row"]), ("delta", delta, spec["row"]),
                ("qpos", meta["qpos"], spec["qpos"]), ("thr", meta.get("thr"), spec["row"]),
                ("qseg", meta.get("qseg"), spec["qseg"])] + [(n, a, _HBM) for n, a in walked.items()]
    scratch = [pltpu.VMEM((cfg.rows, head_dim), jnp.float32)] + _walk_scratch(cfg, _key_side(cfg, head_dim), walked)
    return _call(cfg, _dq_kernel, "dma_tpu_backward_dq", grid=(b, kh, n_rows // cfg.rows),
                 tables=(meta["run_lo"], meta["run_n"]), operands=operands, out_specs=spec["q"],
                 out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), scratch=scratch, pairs=cfg.fwd_pairs * kh,
                 matmuls=3, head_dim=head_dim)


# --- backward: dK, dV, d-bias ----------------------------------------------------------------------------------

_DKV_NAMES = ["k", "v", "dt", "kpos", "kseg", "q", "do", "lse", "delta", "qpos", "thr", "qseg", "dk", "dv", "ddt",
              "dk_scr", "dv_scr", "ddt_scr", "q_buf", "do_buf", "lse_buf", "delta_buf", "qpos_buf", "thr_buf",
              "qseg_buf", "sem"]


def _dkv_kernel(q_lo_ref, q_n_ref, *refs, cfg: TpuKernelConfig):
    r = _unpack(cfg, refs, _DKV_NAMES)
    b, h = pl.program_id(0), pl.program_id(1)
    for name in ("dk_scr", "dv_scr", "ddt_scr"):
        r[name][...] = jnp.zeros(r[name].shape, jnp.float32)

    def visit(x):
        x.update({name: r[name][...] for name in ("k", "dt", "kpos", "kseg") if r[name] is not None})
        q, do = x["q"], x["do"]  # [rows, H_p]
        s, keep = _scores(cfg, x)
        p = jnp.where(keep, jnp.exp(s - _column(x["lse"])), 0.0)  # [rows, bk]
        r["dv_scr"][...] += _dot(p.astype(do.dtype), do, 0, 0)  # pᵀ·do: [bk, H_p]
        ds = p * (_dot(do, r["v"][...], 1, 1) - _column(x["delta"]))
        r["dk_scr"][...] += _dot(ds.astype(q.dtype), q, 0, 0)  # dsᵀ·q
        if cfg.bias_rows == 1:
            r["ddt_scr"][...] += jnp.sum(ds, axis=0, keepdims=True)  # [1, bk]
        else:  # head r's bias gradient: the column sum of its slab
            r["ddt_scr"][...] += jnp.sum(ds.reshape(cfg.bias_rows, cfg.block_q, cfg.block_k), axis=1)

    head_dim = r["k"].shape[-1]
    stream = _Stream(cfg, _query_side(cfg, head_dim), r, b, h)
    _walk(q_lo_ref, q_n_ref, _program_base(1), 1, 0, stream, visit)
    r["dk"][...] = (r["dk_scr"][...] * cfg.scale).astype(r["dk"].dtype)
    r["dv"][...] = r["dv_scr"][...].astype(r["dv"].dtype)
    r["ddt"][...] = r["ddt_scr"][...]


def _backward_dkv(cfg: TpuKernelConfig, q, k, v, dt, meta, do, lse, delta):
    b, kh, n_keys, head_dim = k.shape
    spec = _block_specs(cfg, head_dim)
    walked = {"q": q, "do": do, "lse": lse, "delta": delta, "qpos": meta["qpos"], "thr": meta.get("thr"),
              "qseg": meta.get("qseg")}
    operands = [("k", k, spec["k"]), ("v", v, spec["k"]), ("dt", dt, spec["dt"]), ("kpos", meta["kpos"], spec["kpos"]),
                ("kseg", meta.get("kseg"), spec["kpos"])] + [(n, a, _HBM) for n, a in walked.items()]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(dt.shape, jnp.float32)]
    scratch = [pltpu.VMEM((cfg.block_k, head_dim), jnp.float32), pltpu.VMEM((cfg.block_k, head_dim), jnp.float32),
               pltpu.VMEM((cfg.bias_rows, cfg.block_k), jnp.float32)] + _walk_scratch(
                   cfg, _query_side(cfg, head_dim), walked)
    return _call(cfg, _dkv_kernel, "dma_tpu_backward_dkv", grid=(b, kh, n_keys // cfg.block_k),
                 tables=(meta["q_lo"], meta["q_n"]), operands=operands,
                 out_specs=[spec["k"], spec["k"], spec["dt"]], out_shape=out_shape, scratch=scratch,
                 pairs=cfg.dkv_pairs * kh, matmuls=4, head_dim=head_dim)


# --- autodiff ----------------------------------------------------------------------------------------------------

def flash_dma(cfg: TpuKernelConfig, q, k, v, dt, meta):
    """(o, lse) of DMA in the kernel layout (module docstring). meta: kpos, qpos, the walk tables (run_lo, run_n:
    int32 [B·K·tiles·kv_runs]; q_lo, q_n: int32 [B·K·key blocks]) and thr / qseg / kseg as configured.

    lse is −inf on rows with no kept key (their o is 0). Only q, k, v and dt are differentiated; the forward
    kernel runs once per layer under remat_policy="attention" (`_shared.with_kernel_backward`).
    """
    return _shared.with_kernel_backward(_forward_call, _backward, cfg, q, k, v, dt, meta)


_forward_call = jax.jit(_forward, static_argnums=0)


def _backward(cfg, q, k, v, dt, meta, o, lse, do):
    do = do.astype(q.dtype)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B, K, 1, T_p·R]
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)[:, :, None, :]  # empty rows keep no key: avoid inf arithmetic
    dq = _backward_dq(cfg, q, k, v, dt, meta, do, lse, delta)
    dk, dv, ddt = _backward_dkv(cfg, q, k, v, dt, meta, do, lse, delta)
    return dq, dk, dv, ddt
