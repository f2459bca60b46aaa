"""The fused DMA kernels: forward, dQ and dK/dV/d-bias, wired through custom_vjp.

Layout (prepared by doge_jax.kernels.gpu_dma): the R query heads of a kv head are folded into rows, so one program
reads each K/V tile once for the whole group (GQA without repeating K/V) and the dK/dV/d-bias of a kv head are
complete sums with no atomics.

    q, do, o   [B, K, T·R, H]   row ρ = t·R + r (query position t, head k·R + r)
    k, v       [B, K, S, H]     in walk order (identity, or `perm` of _topk.sparse_plan)
    kpos       [B, K', S]       key position; NO_KEY for padding / kv_mask=False (K' = K, or 1 when shared)
    dt         [B, K, Gr, S]    the additive bias, fp32; Gr = 1 (one bias per kv head) or R (one per query head)
    thr        [B, K, T·R]      per-row top-k threshold (only when top-k is active)
    lse, delta [B, K, T·R]      fp32

A query tile holds block_q positions × R heads (block_q·R rows). Keys are walked in chunks of `chunk` positions:
chunks entirely before the tile contribute their first ntab[c] keys (dense walk: all of them), chunks overlapping
the tile are walked in full; everything else is causally masked, and so never visited. Scores are fp32:
s = q·kᵀ·scale + dt, then the exact mask (causal, window, segments, dt ≥ thr) decides which keys count.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from doge_jax.kernels import shared as _shared

NO_KEY = 2**30  # position of a missing key: after every query, so the causal test drops it
_NEG = -1e30  # running-max floor; exp(_NEG − m) underflows to 0 for any real score m


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static description of one attention call (hashable: it keys the jit cache)."""

    scale: float
    block_q: int  # query positions per tile (block_q·heads_per_kv rows)
    block_k: int  # keys per tile
    heads_per_kv: int  # R
    bias_rows: int  # Gr: 1 or R
    q_offset: int
    sliding_window: int | None
    chunk: int  # walk chunk; == block_k for the dense walk
    sparse: bool  # walk only ntab[c] keys of earlier chunks
    has_thr: bool
    has_segments: bool
    shared_kpos: bool  # kpos is [B, 1, S] (dense walk) rather than per kv head
    interpret: bool
    num_warps: int | None = None
    num_stages: int = 2
    dkv_warps: int | None = None  # the dK/dV kernel's num_warps (None: num_warps)

    def __post_init__(self):
        for name in ("block_q", "block_k", "heads_per_kv", "chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.chunk % self.block_k:
            raise ValueError(f"chunk={self.chunk} must be a multiple of block_k={self.block_k}")
        if self.bias_rows not in (1, self.heads_per_kv):
            raise ValueError(f"bias_rows={self.bias_rows} must be 1 or heads_per_kv={self.heads_per_kv}")

    @property
    def rows(self) -> int:
        return self.block_q * self.heads_per_kv


def _compiler_params(cfg: KernelConfig, head_dim: int, *, dkv: bool = False):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton  # GPU only

    warps = (dkv and cfg.dkv_warps) or cfg.num_warps or (4 if head_dim <= 64 else 8)
    return pltriton.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def _dot(a, b, contract_a: int, contract_b: int):
    """fp32-accumulated matmul; fp32 inputs use full fp32 precision (no TF32) to match the reference."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _row_iota(cfg: KernelConfig) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (cfg.rows,), 0)


def _bias(cfg: KernelConfig, dt_ref, ks) -> jax.Array:
    """The bias tile broadcast to rows: [1, bk] (shared by the group) or [rows, bk] (one bias row per head)."""
    if cfg.bias_rows == 1:
        return dt_ref[ks][None, :]
    head = lax.rem(_row_iota(cfg), cfg.heads_per_kv)[:, None]
    bias = jnp.zeros((cfg.rows, cfg.block_k), jnp.float32)
    for r in range(cfg.bias_rows):  # a select per head: tiles cannot be gathered along rows on every backend
        bias = jnp.where(head == r, dt_ref[r, ks][None, :], bias)
    return bias


def _keep(cfg: KernelConfig, qpos, kpos, bias, thr, qseg, kseg) -> jax.Array:
    """[rows, bk] bool: exactly MaskSpec.allowed plus the top-k rule."""
    keep = kpos[None, :] <= qpos[:, None]
    if cfg.sliding_window is not None:
        keep &= kpos[None, :] > qpos[:, None] - cfg.sliding_window
    if cfg.has_segments:
        keep &= qseg[:, None] == kseg[None, :]
    if cfg.has_thr:
        keep &= bias >= thr[:, None]
    return keep


def _walk(cfg: KernelConfig, n_keys: int, tile, ntab_ref, visit, carry):
    """Calls carry = visit(key_start, carry) for every key block query tile `tile` may need (module docstring)."""
    chunk, bk = cfg.chunk, cfg.block_k
    n_chunks = pl.cdiv(n_keys, chunk)
    p_first = cfg.q_offset + tile * cfg.block_q
    c_last = jnp.minimum(lax.div(p_first + cfg.block_q - 1, chunk), n_chunks - 1)
    if not cfg.sparse:  # chunk == block_k: every causal (and in-window) key block once
        c_lo = 0
        if cfg.sliding_window is not None:
            c_lo = lax.div(jnp.maximum(p_first - cfg.sliding_window + 1, 0), chunk)
        return lax.fori_loop(c_lo, c_last + 1, lambda c, cr: visit(c * bk, cr), carry)

    def blocks(c, n_blocks, carry):
        return lax.fori_loop(0, n_blocks, lambda u, cr: visit(c * chunk + u * bk, cr), carry)

    c_first = jnp.minimum(lax.div(p_first, chunk), n_chunks)  # chunks before it lie wholly before the tile
    carry = lax.fori_loop(0, c_first, lambda c, cr: blocks(c, lax.div(ntab_ref[c] + bk - 1, bk), cr), carry)
    whole = lambda c, cr: blocks(c, lax.div(jnp.minimum(chunk, n_keys - c * chunk), bk), cr)  # noqa: E731
    return lax.fori_loop(c_first, c_last + 1, whole, carry)


def _enabled(cfg: KernelConfig, name: str) -> bool:
    """Whether the optional operand `name` is passed for this config."""
    if name == "thr":
        return cfg.has_thr
    if name in ("qseg", "kseg"):
        return cfg.has_segments
    if name in ("ntab", "tile_exit"):
        return cfg.sparse
    return True


def _unpack(cfg: KernelConfig, refs, names):
    """Names the refs of a kernel; absent optional operands are None."""
    refs = list(refs)
    out = {name: refs.pop(0) if _enabled(cfg, name) else None for name in names}
    assert not refs, refs
    return out


# --- forward ---------------------------------------------------------------------------------------------------

def _fwd_kernel(*refs, cfg: KernelConfig, n_keys: int):
    r = _unpack(cfg, refs, ["q", "k", "v", "kpos", "dt", "thr", "qseg", "kseg", "ntab", "o", "lse"])
    tile = pl.program_id(2)
    q = r["q"][...]  # [rows, H]
    qpos = cfg.q_offset + tile * cfg.block_q + lax.div(_row_iota(cfg), cfg.heads_per_kv)
    thr = None if r["thr"] is None else r["thr"][...]
    qseg = None if r["qseg"] is None else r["qseg"][...]

    def visit(start, carry):
        acc, m_prev, l_prev = carry
        ks = pl.ds(pl.multiple_of(start, cfg.block_k), cfg.block_k)
        k, v = r["k"][ks, :], r["v"][ks, :]  # [bk, H]
        bias = _bias(cfg, r["dt"], ks)
        s = _dot(q, k, 1, 1) * cfg.scale + bias  # [rows, bk]
        kseg = None if r["kseg"] is None else r["kseg"][ks]
        keep = _keep(cfg, qpos, r["kpos"][ks], bias, thr, qseg, kseg)
        s = jnp.where(keep, s, _NEG)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.where(keep, jnp.exp(s - m_next[:, None]), 0.0)
        correction = jnp.exp(m_prev - m_next)
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v, 1, 0)
        return acc, m_next, l_next

    head_dim = q.shape[-1]
    carry = (jnp.zeros((cfg.rows, head_dim), jnp.float32), jnp.full((cfg.rows,), _NEG, jnp.float32),
             jnp.zeros((cfg.rows,), jnp.float32))
    acc, m, denom = _walk(cfg, n_keys, tile, r["ntab"], visit, carry)
    empty = denom == 0.0  # no allowed key: the wrapper substitutes the reference's uniform row
    denom = jnp.where(empty, 1.0, denom)
    r["o"][...] = (acc / denom[:, None]).astype(r["o"].dtype)
    r["lse"][...] = jnp.where(empty, -jnp.inf, m + jnp.log(denom))


def _key_specs(cfg: KernelConfig, n_keys: int, head_dim: int, *, tiled: bool):
    """BlockSpecs of k, v, kpos, dt, kseg: whole sequences (walked inside the kernel) or one key tile per program."""
    bk = cfg.block_k if tiled else n_keys

    def at(j):
        return j if tiled else 0

    kv = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j: (b, h, at(j), 0))
    if cfg.shared_kpos:
        kpos = pl.BlockSpec((None, None, bk), lambda b, h, j: (b, 0, at(j)))
    else:
        kpos = pl.BlockSpec((None, None, bk), lambda b, h, j: (b, h, at(j)))
    if cfg.bias_rows == 1:
        dt = pl.BlockSpec((None, None, None, bk), lambda b, h, j: (b, h, 0, at(j)))
    else:
        dt = pl.BlockSpec((None, None, cfg.bias_rows, bk), lambda b, h, j: (b, h, 0, at(j)))
    kseg = pl.BlockSpec((None, bk), lambda b, h, j: (b, at(j))) if cfg.has_segments else None
    return kv, kpos, dt, kseg


def _row_specs(cfg: KernelConfig, n_rows: int, head_dim: int, *, tiled: bool):
    """BlockSpecs of q-like [B, K, T·R, H] arrays, per-row vectors [B, K, T·R] and qseg [B, T·R]."""
    rows = cfg.rows if tiled else n_rows

    def at(i):
        return i if tiled else 0

    mat = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, i: (b, h, at(i), 0))
    vec = pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, at(i)))
    seg = pl.BlockSpec((None, rows), lambda b, h, i: (b, at(i)))
    return mat, vec, seg


def _present(cfg: KernelConfig, operands):
    """(array, BlockSpec) of the operands this config passes, in kernel order."""
    return [(a, s) for name, a, s in operands if _enabled(cfg, name)]


def _forward(cfg: KernelConfig, q, k, v, dt, meta):
    b, kh, n_rows, head_dim = q.shape
    n_keys = k.shape[2]
    n_tiles = n_rows // cfg.rows
    kv_spec, kpos_spec, dt_spec, kseg_spec = _key_specs(cfg, n_keys, head_dim, tiled=False)
    mat, vec, seg = _row_specs(cfg, n_rows, head_dim, tiled=True)
    n_chunks = meta["ntab"].shape[-1] if cfg.sparse else 0
    ntab_spec = pl.BlockSpec((None, None, None, n_chunks), lambda b_, h, i: (b_, h, i, 0))
    operands = _present(cfg, [
        ("q", q, mat), ("k", k, kv_spec), ("v", v, kv_spec), ("kpos", meta["kpos"], kpos_spec), ("dt", dt, dt_spec),
        ("thr", meta.get("thr"), vec), ("qseg", meta.get("qseg"), seg), ("kseg", meta.get("kseg"), kseg_spec),
        ("ntab", meta.get("ntab"), ntab_spec)])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_keys=n_keys),
        grid=(b, kh, n_tiles),
        in_specs=[s for _, s in operands],
        out_specs=[mat, vec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, v.dtype), jax.ShapeDtypeStruct((b, kh, n_rows), jnp.float32)],
        compiler_params=_compiler_params(cfg, head_dim),
        interpret=cfg.interpret,
        name="dma_forward",
    )(*[a for a, _ in operands])


# --- backward: dQ ----------------------------------------------------------------------------------------------

def _dq_kernel(*refs, cfg: KernelConfig, n_keys: int):
    r = _unpack(cfg, refs, ["q", "do", "lse", "delta", "k", "v", "kpos", "dt", "thr", "qseg", "kseg", "ntab", "dq"])
    tile = pl.program_id(2)
    q, do = r["q"][...], r["do"][...]
    lse = r["lse"][...]
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)  # empty rows keep no key; avoid inf arithmetic
    delta = r["delta"][...]
    qpos = cfg.q_offset + tile * cfg.block_q + lax.div(_row_iota(cfg), cfg.heads_per_kv)
    thr = None if r["thr"] is None else r["thr"][...]
    qseg = None if r["qseg"] is None else r["qseg"][...]

    def visit(start, dq):
        ks = pl.ds(pl.multiple_of(start, cfg.block_k), cfg.block_k)
        k, v = r["k"][ks, :], r["v"][ks, :]
        bias = _bias(cfg, r["dt"], ks)
        s = _dot(q, k, 1, 1) * cfg.scale + bias
        kseg = None if r["kseg"] is None else r["kseg"][ks]
        keep = _keep(cfg, qpos, r["kpos"][ks], bias, thr, qseg, kseg)
        p = jnp.where(keep, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (_dot(do, v, 1, 1) - delta[:, None])  # [rows, bk]: d(score) = d(bias)
        return dq + _dot(ds.astype(k.dtype), k, 1, 0)

    dq = _walk(cfg, n_keys, tile, r["ntab"], visit, jnp.zeros(q.shape, jnp.float32))
    r["dq"][...] = (dq * cfg.scale).astype(r["dq"].dtype)


def _backward_dq(cfg: KernelConfig, q, k, v, dt, meta, do, lse, delta):
    b, kh, n_rows, head_dim = q.shape
    n_keys = k.shape[2]
    kv_spec, kpos_spec, dt_spec, kseg_spec = _key_specs(cfg, n_keys, head_dim, tiled=False)
    mat, vec, seg = _row_specs(cfg, n_rows, head_dim, tiled=True)
    n_chunks = meta["ntab"].shape[-1] if cfg.sparse else 0
    ntab_spec = pl.BlockSpec((None, None, None, n_chunks), lambda b_, h, i: (b_, h, i, 0))
    operands = _present(cfg, [
        ("q", q, mat), ("do", do, mat), ("lse", lse, vec), ("delta", delta, vec), ("k", k, kv_spec),
        ("v", v, kv_spec), ("kpos", meta["kpos"], kpos_spec), ("dt", dt, dt_spec), ("thr", meta.get("thr"), vec),
        ("qseg", meta.get("qseg"), seg), ("kseg", meta.get("kseg"), kseg_spec), ("ntab", meta.get("ntab"), ntab_spec)])
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, n_keys=n_keys),
        grid=(b, kh, n_rows // cfg.rows),
        in_specs=[s for _, s in operands],
        out_specs=mat,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, head_dim),
        interpret=cfg.interpret,
        name="dma_backward_dq",
    )(*[a for a, _ in operands])


# --- backward: dK, dV, d-bias ----------------------------------------------------------------------------------

def _dkv_kernel(*refs, cfg: KernelConfig, n_rows: int, n_keys: int):
    r = _unpack(cfg, refs, ["k", "v", "kpos", "dt", "kseg", "tile_exit", "q", "do", "lse", "delta", "thr", "qseg",
                            "dk", "dv", "ddt"])
    j = pl.program_id(2)
    n_tiles = n_rows // cfg.rows
    k, v = r["k"][...], r["v"][...]  # [bk, H]
    kpos = r["kpos"][...]
    kseg = None if r["kseg"] is None else r["kseg"][...]
    bias_rows = [r["dt"][...]] if cfg.bias_rows == 1 else [r["dt"][g, :] for g in range(cfg.bias_rows)]
    head = lax.rem(_row_iota(cfg), cfg.heads_per_kv)[:, None]

    # The query tiles whose walk (_walk) includes this key block: from the first tile reaching the chunk, to the
    # last tile overlapping it, or (sparse walk) to the first tile past this block's exit.
    chunk_start = lax.div(j * cfg.block_k, cfg.chunk) * cfg.chunk
    chunk_end = jnp.minimum(chunk_start + cfg.chunk, n_keys) - 1
    i_lo = lax.div(jnp.maximum(chunk_start - cfg.q_offset, 0), cfg.block_q)
    reach = chunk_end + (cfg.sliding_window - 1 if cfg.sliding_window is not None else 0) - cfg.q_offset
    i_hi = jnp.where(reach >= 0, lax.div(jnp.maximum(reach, 0), cfg.block_q) + 1, 0)
    if cfg.sparse:
        i_hi = jnp.maximum(i_hi, r["tile_exit"][j])
    elif cfg.sliding_window is None:
        i_hi = n_tiles
    i_hi = jnp.minimum(i_hi, n_tiles)

    def visit(i, carry):
        dk, dv, dbias = carry
        rs = pl.ds(pl.multiple_of(i * cfg.rows, cfg.rows), cfg.rows)
        q, do = r["q"][rs, :], r["do"][rs, :]
        lse = r["lse"][rs]
        lse = jnp.where(lse == -jnp.inf, 0.0, lse)
        qpos = cfg.q_offset + i * cfg.block_q + lax.div(_row_iota(cfg), cfg.heads_per_kv)
        if cfg.bias_rows == 1:
            bias = bias_rows[0][None, :]
        else:
            bias = jnp.zeros((cfg.rows, cfg.block_k), jnp.float32)
            for g, row in enumerate(bias_rows):
                bias = jnp.where(head == g, row[None, :], bias)
        s = _dot(q, k, 1, 1) * cfg.scale + bias
        thr = None if r["thr"] is None else r["thr"][rs]
        qseg = None if r["qseg"] is None else r["qseg"][rs]
        keep = _keep(cfg, qpos, kpos, bias, thr, qseg, kseg)
        p = jnp.where(keep, jnp.exp(s - lse[:, None]), 0.0)  # [rows, bk]
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
        ds = p * (_dot(do, v, 1, 1) - r["delta"][rs][:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)
        # One bias per kv head: its column sum. One per query head: dS summed over the tiles as [rows, bk] (row ρ
        # is always head ρ mod R) and split by head once at the end; a masked sum per head in every step kept R
        # temporaries live and spilled registers on sm_90 (benchmarks/gpu_compile_table.py).
        dbias = dbias + (jnp.sum(ds, axis=0) if cfg.bias_rows == 1 else ds)
        return dk, dv, dbias

    zeros_kv = jnp.zeros(k.shape, jnp.float32)
    zeros_b = jnp.zeros((cfg.block_k,) if cfg.bias_rows == 1 else (cfg.rows, cfg.block_k), jnp.float32)
    dk, dv, dbias = lax.fori_loop(i_lo, i_hi, visit, (zeros_kv, zeros_kv, zeros_b))
    r["dk"][...] = (dk * cfg.scale).astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)
    if cfg.bias_rows == 1:
        r["ddt"][...] = dbias
    else:
        for g in range(cfg.bias_rows):
            r["ddt"][g, :] = jnp.sum(jnp.where(head == g, dbias, 0.0), axis=0)


def _backward_dkv(cfg: KernelConfig, q, k, v, dt, meta, do, lse, delta):
    b, kh, n_rows, head_dim = q.shape
    n_keys = k.shape[2]
    kv_spec, kpos_spec, dt_spec, kseg_spec = _key_specs(cfg, n_keys, head_dim, tiled=True)
    mat, vec, seg = _row_specs(cfg, n_rows, head_dim, tiled=False)
    n_key_tiles = n_keys // cfg.block_k
    exit_spec = pl.BlockSpec((None, None, n_key_tiles), lambda b_, h, j: (b_, h, 0))
    operands = _present(cfg, [
        ("k", k, kv_spec), ("v", v, kv_spec), ("kpos", meta["kpos"], kpos_spec), ("dt", dt, dt_spec),
        ("kseg", meta.get("kseg"), kseg_spec), ("tile_exit", meta.get("tile_exit"), exit_spec), ("q", q, mat),
        ("do", do, mat), ("lse", lse, vec), ("delta", delta, vec), ("thr", meta.get("thr"), vec),
        ("qseg", meta.get("qseg"), seg)])
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, n_rows=n_rows, n_keys=n_keys),
        grid=(b, kh, n_key_tiles),
        in_specs=[s for _, s in operands],
        out_specs=[kv_spec, kv_spec, dt_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct(dt.shape, jnp.float32)],
        compiler_params=_compiler_params(cfg, head_dim, dkv=True),
        interpret=cfg.interpret,
        name="dma_backward_dkv",
    )(*[a for a, _ in operands])


# --- autodiff ----------------------------------------------------------------------------------------------------

def fused_attention(cfg: KernelConfig, q, k, v, dt, meta):
    """(o, lse) of DMA in the kernel layout. meta: kpos, and thr / qseg / kseg / ntab / tile_exit as configured.

    lse is −inf on rows with no kept key (their o is 0). Only q, k, v and dt are differentiated; the forward
    kernel runs once per layer under remat_policy="attention" (`_shared.with_kernel_backward`).
    """
    return _shared.with_kernel_backward(_forward_call, _backward, cfg, q, k, v, dt, meta)


_forward_call = jax.jit(_forward, static_argnums=0)


def _backward(cfg, q, k, v, dt, meta, o, lse, do):
    do = do.astype(q.dtype)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, K, T·R]
    dq = _backward_dq(cfg, q, k, v, dt, meta, do, lse, delta)
    dk, dv, ddt = _backward_dkv(cfg, q, k, v, dt, meta, do, lse, delta)
    return dq, dk, dv, ddt
