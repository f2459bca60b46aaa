"""dma_pallas_tpu: Dynamic Mask Attention on the Mosaic-TPU kernels of tpu_flash.

Same inputs, masks and outputs as the reference (`doge_jax.model.dma_reference`). What happens here, around the kernels:
- layouts: R query heads folded head-major into the rows of a tile (tpu_flash docstring), sequences padded to
  the tiles, the head dim padded to a multiple of 128 lanes with zeros (q·k and p·v are unchanged by it);
- top-k thresholds: `shared.topk_setup` (plain XLA, shared with the Triton entry): a prefix order statistic for causal /
  padding masks, exact chunked top_k for segments and sliding windows;
- walk tables, scalar-prefetched into SMEM (tpu_flash docstring). Band walk: per query tile the contiguous range
  of key blocks that hold an allowed key (causal band, window, kv_mask), per key block the range of query tiles
  that can see it. Sparse walk (the top-k active and S ≥ 4·keep_window_size, or sparse=True): each key's interval
  of query tiles that keep it, from the thresholds (topk.prefix_key_intervals, or general_key_intervals for
  segments and windows), keys permuted per kv head by topk.walk_plan, and each tile walks only the key blocks
  holding a key it may keep: at T = 16k, keep_window_size = 2048, 1.015× the blocks that hold kept keys and a
  3.2× shorter roofline than the band walk (benchmarks/tpu_roofline.py). k, v and dt are permuted outside the
  kernel (shared.permute_keys), and their gradients permuted back;
- rows with no allowed key (left padding): the reference's uniform average, through `shared.uniform_rows`.
Inputs the kernel cannot take are named by `tpu_unsupported_reason` (one line), and `dma_pallas_tpu` raises it.
On a backend other than TPU the kernels run in TPU interpret mode (`pltpu.InterpretParams`), which checks
out-of-bounds reads and uninitialised memory, so the same call works on a laptop.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from doge_jax.kernels import shared as _shared
from doge_jax.kernels import target as _target
from doge_jax.kernels import topk as _topk
from doge_jax.kernels import tpu_flash
from doge_jax.model.mask import MaskSpec

_ROWS_TARGET = 512  # rows (block_q·R) per query tile by default: ≥ 256 keeps every pass MXU-bound on v5e
_BLOCK_K = 512  # keys per block on the band walk
_SPARSE_BLOCK_K = 128  # on the sparse walk: finer blocks carry fewer dropped keys (benchmarks/tpu_roofline.py)
_SPARSE_MIN_WINDOWS = 4  # sparse walk by default from S = 4·keep_window_size; at 2w it visits as much as the band
_MAX_HEAD_DIM = 256
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def tpu_unsupported_reason(q: jax.Array, k: jax.Array, dt: jax.Array, mask: MaskSpec, *,
                           dropout_rate: float = 0.0) -> str | None:
    """Why `dma_pallas_tpu` cannot take this call (one line, completing "cannot run ..."), or None when it can."""
    del k, dt
    if dropout_rate > 0.0:
        return f"attention dropout {dropout_rate} (the kernel has no dropout)"
    offset = mask.static_offset
    if offset is None:
        return "a traced or per-batch q_offset (decoding with a KV cache)"
    if offset < 0:
        return f"q_offset={offset} (must be >= 0)"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head_dim={q.shape[-1]} (must be <= {_MAX_HEAD_DIM})"
    if jnp.dtype(q.dtype) not in _DTYPES:
        return f"dtype {jnp.dtype(q.dtype).name} (must be float32 or bfloat16)"
    return None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _q_quantum(r_heads: int) -> int:
    """Smallest block_q with sublane-aligned head slabs (multiple of 8) and rows a multiple of 128 lanes."""
    return math.lcm(tpu_flash.NUM_SUBLANES, tpu_flash.NUM_LANES // math.gcd(tpu_flash.NUM_LANES, r_heads))


def _sparse_walk(mask: MaskSpec, s: int, sparse: bool | None) -> bool:
    """Whether the call walks only the key blocks holding kept keys (the top-k must be active)."""
    w, window = mask.keep_window_size, mask.sliding_window
    if s <= w or (window is not None and window <= w):
        return False  # no row can see more than w keys: the top-k keeps every allowed key
    return sparse if sparse is not None else s >= _SPARSE_MIN_WINDOWS * w


def _block_sizes(t: int, s: int, r_heads: int, block_q: int | None, block_k: int | None,
                 sparse: bool = False) -> tuple[int, int]:
    quantum = _q_quantum(r_heads)
    if block_q is None:
        block_q = max(quantum, _ROWS_TARGET // r_heads // quantum * quantum)
        block_q = min(block_q, _round_up(t, quantum))
    elif block_q % quantum:
        raise ValueError(f"dma_pallas_tpu: block_q={block_q} must be a multiple of {quantum} for N/K={r_heads} "
                         f"(sublane-aligned head slabs, block_q*N/K a multiple of 128)")
    if block_k is None:
        block_k = min(_SPARSE_BLOCK_K if sparse else _BLOCK_K, _round_up(s, tpu_flash.NUM_LANES))
    elif block_k % tpu_flash.NUM_LANES or block_k < 1:
        raise ValueError(f"dma_pallas_tpu: block_k={block_k} must be a positive multiple of 128")
    return block_q, block_k


def _interpret_params(interpret):
    """None on TPU (compiled); InterpretParams elsewhere, or when asked for with True."""
    if interpret is None:
        interpret = _target.backend() != "tpu"
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or None


def _band_tables(*, b, kh, t, s, offset, block_q, block_k, sliding_window, valid):
    """The band walk: per query tile one run of key blocks, per key block one range of query tiles.

    Query tile i (real positions p_first..p_last) needs key blocks c_lo..c_hi (causal band and window), narrowed to
    the first/last block holding a valid key. Key block j (keys k0..k1) is seen by the tiles with p_last ≥ k0 and,
    with a window, p_first ≤ k1 + window − 1; none when the block has no valid key. Returns the tables (flattened
    [B, K, tiles, 1] and [B, K, blocks], the same for every kv head) and the static pair counts of the band.
    """
    n_q, n_kb = -(-t // block_q), valid.shape[1] // block_k
    i = np.arange(n_q)
    p_first = offset + i * block_q
    p_last = offset + np.minimum((i + 1) * block_q, t) - 1
    c_hi = np.minimum(p_last, s - 1) // block_k
    c_lo = np.zeros(n_q, np.int64) if sliding_window is None else np.maximum(p_first - sliding_window + 1, 0) // block_k
    fwd_static = np.maximum(c_hi - c_lo + 1, 0)

    j = np.arange(n_kb)
    k0, k1 = j * block_k, np.minimum((j + 1) * block_k, s) - 1
    q_lo = np.searchsorted(p_last, k0, side="left")
    q_hi = np.full(n_kb, n_q - 1) if sliding_window is None else (
        np.searchsorted(p_first, k1 + sliding_window - 1, side="right") - 1)
    dkv_static = np.maximum(q_hi - q_lo + 1, 0)

    block_valid = valid.reshape(b, n_kb, block_k).any(-1)  # [B, n_kb]
    idx = jnp.arange(n_kb, dtype=jnp.int32)
    next_valid = jax.lax.cummin(jnp.where(block_valid, idx, n_kb), axis=1, reverse=True)
    prev_valid = jax.lax.cummax(jnp.where(block_valid, idx, -1), axis=1)
    lo = next_valid[:, np.minimum(c_lo, n_kb - 1)]
    hi = prev_valid[:, c_hi]
    kv_n = jnp.where(fwd_static > 0, jnp.maximum(hi - lo + 1, 0), 0)

    def per_head(x):  # [B, n] → flattened [B, K, n]
        return jnp.broadcast_to(x.astype(jnp.int32)[:, None, :], (b, kh, x.shape[-1])).reshape(-1)

    tables = {
        "run_lo": per_head(jnp.clip(lo, 0, n_kb - 1)),
        "run_n": per_head(kv_n),
        "q_lo": per_head(jnp.broadcast_to(jnp.asarray(np.minimum(q_lo, n_q - 1)), (b, n_kb))),
        "q_n": per_head(jnp.where(block_valid, jnp.asarray(dkv_static, jnp.int32), 0)),
    }
    return tables, dict(fwd_pairs=b * int(fwd_static.sum()), dkv_pairs=b * int(dkv_static.sum()))


def _sparse_tables(*, thr, dt_w, valid, mask: MaskSpec, t, block_q, block_k, chunk):
    """The sparse walk (topk.walk_plan): the key order perm [B, K, S_p] and the tables of both walks, flattened."""
    n_tiles = -(-t // block_q)
    if mask.q_segment_ids is not None or mask.sliding_window is not None:
        enter, exit_ = _topk.general_key_intervals(dt_w, thr, valid, mask, q_len=t, block_q=block_q)
    else:
        dtm = jnp.where(valid[:, None, None, :], dt_w, -jnp.inf)
        enter, exit_ = _topk.prefix_key_intervals(dtm, thr, q_offset=mask.static_offset, q_len=t, block_q=block_q)
    perm, runs_n, q_lo, q_n = _topk.walk_plan(enter, exit_, n_tiles=n_tiles, block_k=block_k, chunk=chunk)
    tables = {"run_lo": jnp.zeros(runs_n.size, jnp.int32), "run_n": runs_n.reshape(-1),
              "q_lo": q_lo.reshape(-1), "q_n": q_n.reshape(-1)}
    return perm, tables


def _to_rows(x, n_tiles: int, block_q: int):
    """[B, T_p, K, R, ...] → [B, K, T_p·R, ...], head-major inside each tile of block_q positions."""
    b, _, kh, r = x.shape[:4]
    rest = x.shape[4:]
    x = x.reshape(b, n_tiles, block_q, kh, r, *rest)
    x = jnp.moveaxis(x, (3, 4), (1, 3))  # [B, K, n_tiles, R, block_q, ...]
    return x.reshape(b, kh, n_tiles * r * block_q, *rest)


def _from_rows(x, n_tiles: int, block_q: int, r: int):
    """Inverse of _to_rows: [B, K, T_p·R, ...] → [B, T_p, K·R, ...]."""
    b, kh = x.shape[:2]
    rest = x.shape[3:]
    x = x.reshape(b, kh, n_tiles, r, block_q, *rest)
    x = jnp.moveaxis(x, (1, 3), (3, 4))  # [B, n_tiles, block_q, K, R, ...]
    return x.reshape(b, n_tiles * block_q, kh * r, *rest)


def dma_pallas_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dt: jax.Array,
    mask: MaskSpec,
    *,
    scale: float,
    interpret=None,
    block_q: int | None = None,
    block_k: int | None = None,
    sparse: bool | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """Fused DMA on TPU. q [B, T, N, H], k/v [B, S, K, H], dt [B, G, S] (G = K or N) → [B, T, N, H] in v's dtype.

    Semantics of `dma_reference` without dropout; raises ValueError (one line) for a call
    `tpu_unsupported_reason` rejects. block_q: query positions per tile (a tile holds block_q·N/K rows; default
    ≈ 512 rows); block_k: keys per block (multiple of 128; default 512 on the band walk, 128 on the sparse walk).
    sparse: visit only the key blocks holding kept keys (default: when the top-k is active and
    S ≥ 4·keep_window_size); chunk: the sparse walk's chunk of key positions (a multiple of block_k; default
    ≈ sqrt(S·block_k)). interpret: None → TPU interpret mode on any backend but TPU; True → interpret mode; or a
    pltpu.InterpretParams.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = dt.shape[1]
    _shared.check_layout("dma_pallas_tpu", q, k, v, dt)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"dma_pallas_tpu: q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} must be equal")
    reason = tpu_unsupported_reason(q, k, dt, mask)
    if reason:
        raise ValueError(f"dma_pallas_tpu cannot run {reason}")
    keep_window_size, kv_mask, sliding_window = mask.keep_window_size, mask.kv_mask, mask.sliding_window
    q_segment_ids, kv_segment_ids = mask.q_segment_ids, mask.kv_segment_ids
    if not isinstance(keep_window_size, (int, np.integer)) or keep_window_size < 1:
        raise ValueError(f"dma_pallas_tpu: keep_window_size={keep_window_size!r} must be a positive integer")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"dma_pallas_tpu: sliding_window={sliding_window} must be a positive integer")
    offset = mask.static_offset
    r_heads, bias_rows = n // kh, g // kh
    sparse = _sparse_walk(mask, s, sparse)
    block_q, block_k = _block_sizes(t, s, r_heads, block_q, block_k, sparse)
    if sparse:
        chunk = chunk or _topk.default_chunk(_round_up(s, block_k), block_k)
        if chunk % block_k:
            raise ValueError(f"dma_pallas_tpu: chunk={chunk} must be a multiple of block_k={block_k}")
    t_pad, h_pad = _round_up(t, block_q), _round_up(h, tpu_flash.NUM_LANES)
    s_pad = _round_up(s, chunk if sparse else block_k)
    n_tiles = t_pad // block_q

    valid = jnp.ones((b, s), bool) if kv_mask is None else kv_mask.astype(bool)
    valid = jnp.pad(valid, ((0, 0), (0, s_pad - s)))  # [B, S_p]
    dt_w = jnp.pad(dt.astype(jnp.float32), ((0, 0), (0, 0), (0, s_pad - s))).reshape(b, kh, bias_rows, s_pad)
    thr, _, _ = _shared.topk_setup(dt, dt_w, valid, mask, t=t, t_pad=t_pad, block_q=block_q, block_k=block_k,
                                   sparse=False, chunk=None)  # thr [B, K, Gr, T_p] or None

    q_w = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, h_pad - h))).reshape(b, t_pad, kh, r_heads, h_pad)
    q_w = _to_rows(q_w, n_tiles, block_q)  # [B, K, T_p·R, H_p]
    k_w = jnp.pad(k, ((0, 0), (0, s_pad - s), (0, 0), (0, h_pad - h))).transpose(0, 2, 1, 3)  # [B, K, S_p, H_p]
    v_w = jnp.pad(v, ((0, 0), (0, s_pad - s), (0, 0), (0, h_pad - h))).transpose(0, 2, 1, 3)

    def per_head(x):  # [B, S_p] → [B, K, 1, S_p]
        return jnp.broadcast_to(x[:, None, None, :], (b, kh, 1, s_pad))

    qpos = np.where(np.arange(t_pad) < t, offset + np.arange(t_pad), -1).astype(np.int32)  # [T_p]
    qpos = np.broadcast_to(qpos.reshape(n_tiles, 1, block_q), (n_tiles, r_heads, block_q))
    meta = {
        "kpos": per_head(jnp.where(valid, jnp.arange(s_pad, dtype=jnp.int32), tpu_flash.NO_KEY)),
        "qpos": jnp.asarray(qpos.reshape(1, 1, -1)),  # [1, 1, T_p·R]
    }
    if q_segment_ids is not None:
        qseg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)))
        qseg = jnp.broadcast_to(qseg[:, :, None, None], (b, t_pad, 1, r_heads))
        meta["qseg"] = _to_rows(qseg, n_tiles, block_q)  # [B, 1, T_p·R]
        meta["kseg"] = per_head(jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad - s))))
    tables, pairs = _band_tables(b=b, kh=kh, t=t, s=s, offset=offset, block_q=block_q, block_k=block_k,
                                 sliding_window=sliding_window, valid=valid)  # pairs: the band, an upper bound
    walk = dict(kv_runs=1, run_stride=0)
    if sparse:
        perm, tables = _sparse_tables(thr=thr, dt_w=dt_w, valid=valid, mask=mask, t=t, block_q=block_q,
                                      block_k=block_k, chunk=chunk)
        inverse = _shared.inverse_permutation(perm)
        k_w = _shared.permute_keys(k_w, perm, inverse, 2)
        v_w = _shared.permute_keys(v_w, perm, inverse, 2)
        dt_w = _shared.permute_keys(dt_w, perm, inverse, 3)
        for name in ("kpos", "kseg"):
            if name in meta:
                meta[name] = jnp.take_along_axis(meta[name], perm[:, :, None, :], axis=3)
        walk = dict(kv_runs=s_pad // chunk, run_stride=chunk // block_k)
    meta.update(tables)
    if thr is not None:
        thr = jnp.broadcast_to(thr, (b, kh, r_heads, t_pad)).transpose(0, 3, 1, 2)  # [B, T_p, K, R]
        meta["thr"] = _to_rows(thr, n_tiles, block_q)[:, :, None, :]  # [B, K, 1, T_p·R]

    cfg = tpu_flash.TpuKernelConfig(
        scale=float(scale), block_q=block_q, block_k=block_k, heads_per_kv=r_heads, bias_rows=bias_rows,
        sliding_window=sliding_window, has_thr=thr is not None, has_segments=q_segment_ids is not None,
        interpret=_interpret_params(interpret), **walk, **pairs)
    o, lse = tpu_flash.flash_dma(cfg, q_w, k_w, v_w, dt_w, meta)
    out = _from_rows(o, n_tiles, block_q, r_heads)[:, :t, :, :h]  # [B, T, N, H]
    if kv_mask is not None or q_segment_ids is not None or sliding_window is not None:
        lse = _from_rows(lse, n_tiles, block_q, r_heads)[:, :t]  # [B, T, N]
        out = jnp.where((lse == -jnp.inf)[..., None], _shared.uniform_rows(q, k, v, scale).astype(out.dtype), out)
    return out
