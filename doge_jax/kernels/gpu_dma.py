"""dma_pallas_gpu: the fused Triton kernel for Dynamic Mask Attention (`attention_impl="pallas_gpu"`).

Same inputs, masks and outputs as the reference (`doge_jax.model.dma_reference`). What happens here, around the kernel:
- layouts: R query heads folded into rows, K/V per kv head (see _flash), sequences padded to the tiles;
- top-k thresholds (shared.topk_setup): a prefix order statistic for causal/padding masks, exact chunked top_k otherwise;
- the sparse walk (long context): keys permuted per chunk by how long they stay useful, so each query tile reads
  about keep_window_size + chunk keys instead of the whole causal prefix;
- rows with no allowed key (left padding, a segment with no earlier key): the reference gives them a uniform
  average of all S values, because every score is the same float32 min. The kernel returns nothing for them and
  `_uniform_rows` substitutes that average, with the reference's gradients (which are not zero: the reference
  differentiates through the flat softmax).
What it cannot take (`gpu_unsupported_reason` says which, in one line; the dispatcher in
`doge_jax.model.attention_impl` raises it for `"pallas_gpu"` and falls back only for `"auto"`): dropout, a traced
or per-batch q_offset (decoding with a cache), and on a GPU tiles Triton cannot take (rows or head dim not a power
of two ≥ 16) and head dims above 256 (no tile fits the registers of sm_90; interpret mode takes them). float32 runs,
correct but slow (its exact fp32 dots spill on sm_90): `attention_impl="auto"` takes the XLA reference for it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from doge_jax.kernels import gpu_flash as _flash
from doge_jax.kernels import gpu_tiles as _gpu_tiles
from doge_jax.kernels import shared as _shared
from doge_jax.kernels import target as _target
from doge_jax.model.mask import MaskSpec


_MAX_HEAD_DIM = 256  # the largest head dim whose tiles compile for sm_90 without spilling


def _triton_tiles_ok(rows: int, block_k: int, head_dim: int) -> bool:
    """Triton tiles are powers of two, and its matmuls need every dimension ≥ 16."""
    return all(x >= 16 and x & (x - 1) == 0 for x in (rows, block_k, head_dim))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute(x, perm, inverse, axis):
    """x gathered along `axis` by perm [B, K, S]; its transpose is the gather by the inverse (no scatter-add)."""
    return _take(x, perm, axis)


def _take(x, idx, axis):
    idx = jnp.expand_dims(idx, tuple(range(3, x.ndim))) if axis == 2 else idx[:, :, None, :]
    return jnp.take_along_axis(x, idx, axis=axis)


def _permute_fwd(x, perm, inverse, axis):
    return _take(x, perm, axis), inverse


def _permute_bwd(axis, inverse, g):
    return _take(g, inverse, axis), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _sparse_walk(mask: MaskSpec, s: int, sparse: bool | None) -> bool:
    """Whether the call walks only the keys the top-k can keep: what `_shared.topk_setup` is then told to do."""
    w = mask.keep_window_size
    if s <= w or mask.sliding_window is not None or mask.q_segment_ids is not None:
        return False  # the top-k keeps every allowed key, or the thresholds are general (no walk plan)
    return sparse if sparse is not None else s >= 2 * w


def _tiles(n: int, kh: int, h: int, sparse: bool, block_q: int | None, block_k: int | None,
           num_warps: int | None, num_stages: int | None) -> tuple[int, int, int, int, int]:
    """(block_q, block_k, num_warps, num_stages, dK/dV num_warps): the caller's where given (num_warps then serves
    every kernel), else gpu_tiles' table."""
    table = _gpu_tiles.choose(h, sparse=sparse)
    return (block_q or table.block_q(n // kh), block_k or table.block_k, num_warps or table.num_warps,
            num_stages or table.num_stages, num_warps or table.dkv_warps or table.num_warps)


def gpu_unsupported_reason(q: jax.Array, k: jax.Array, dt: jax.Array, mask: MaskSpec, *, dropout_rate: float = 0.0,
                           interpret: bool | None = None, block_q: int | None = None,
                           block_k: int | None = None) -> str | None:
    """Why `dma_pallas_gpu` cannot take this call (one line), or None when it can."""
    n, h, kh = q.shape[2], q.shape[3], k.shape[2]
    if dropout_rate > 0.0:
        return f"attention dropout {dropout_rate} (the kernel has no dropout)"
    if mask.static_offset is None:
        return "a traced or per-batch q_offset (decoding with a KV cache)"
    if interpret is None:
        interpret = _target.backend() != "gpu"
    if not interpret:
        if _target.backend() != "gpu":
            return f"backend {_target.backend()!r} is not a GPU (Triton runs on GPUs only)"
        block_q, block_k, *_ = _tiles(n, kh, h, _sparse_walk(mask, k.shape[1], None), block_q, block_k, None, None)
        if not _triton_tiles_ok(block_q * (n // kh), block_k, h):
            return (f"Triton needs power-of-two tiles >= 16, got block_q*N/K={block_q * (n // kh)}, {block_k=}, "
                    f"head_dim={h}")
        # Compiled for sm_90 (benchmarks/gpu_compile_table.py): above head dim 256 no tile fits the registers.
        if h > _MAX_HEAD_DIM:
            return f"head_dim={h} on a GPU (must be <= {_MAX_HEAD_DIM})"
    return None


def dma_pallas_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dt: jax.Array,
    mask: MaskSpec,
    *,
    scale: float,
    interpret: bool | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    sparse: bool | None = None,
    chunk: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Fused DMA. q [B, T, N, H], k/v [B, S, K, H], dt [B, G, S] (G = K or N) → [B, T, N, H] in v's dtype.

    Semantics of `dma_reference` without dropout. block_q: query positions per tile (a tile holds block_q·N/K
    rows); block_k: keys per tile; these and Triton's num_warps / num_stages default to `gpu_tiles.TABLE`.
    sparse: walk only the keys the top-k can keep (default: when the key length is at least 2·keep_window_size);
    chunk: its chunk of key positions (default ≈ sqrt(S·block_k)).
    interpret=None: interpret mode unless the backend is a GPU (`doge_jax.kernels.target.backend()`, which
    `target.lowering_for("cuda")` sets when lowering for a GPU from another host). Raises ValueError (one line)
    for q, k, v of different dtypes and for a call `gpu_unsupported_reason` rejects.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = dt.shape[1]
    _shared.check_layout("dma_pallas_gpu", q, k, v, dt)
    if not q.dtype == k.dtype == v.dtype:  # Triton's dot takes one input type
        raise ValueError(f"dma_pallas_gpu: q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} must be equal: cast them to "
                         f"one dtype")
    if interpret is None:
        interpret = _target.backend() != "gpu"
    sparse = _sparse_walk(mask, s, sparse)
    block_q, block_k, num_warps, num_stages, dkv_warps = _tiles(n, kh, h, sparse, block_q, block_k, num_warps,
                                                                num_stages)
    reason = gpu_unsupported_reason(q, k, dt, mask, interpret=interpret, block_q=block_q, block_k=block_k)
    if reason:
        raise ValueError(f"dma_pallas_gpu cannot run {reason}")
    offset = mask.static_offset
    kv_mask, q_segment_ids, kv_segment_ids = mask.kv_mask, mask.q_segment_ids, mask.kv_segment_ids
    sliding_window = mask.sliding_window
    r_heads, bias_rows = n // kh, g // kh

    t_pad, s_pad = _round_up(t, block_q), _round_up(s, block_k)

    valid = jnp.ones((b, s), bool) if kv_mask is None else kv_mask.astype(bool)
    valid = jnp.pad(valid, ((0, 0), (0, s_pad - s)))  # [B, S_p]
    kpos = jnp.where(valid, jnp.arange(s_pad, dtype=jnp.int32), _flash.NO_KEY)  # [B, S_p]
    dt_w = jnp.pad(dt.astype(jnp.float32), ((0, 0), (0, 0), (0, s_pad - s))).reshape(b, kh, bias_rows, s_pad)

    thr, plan, chunk = _shared.topk_setup(dt, dt_w, valid, mask, t=t, t_pad=t_pad, block_q=block_q, block_k=block_k,
                                   sparse=sparse, chunk=chunk)

    q_rows = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0))).reshape(b, t_pad, kh, r_heads, h)
    q_rows = q_rows.transpose(0, 2, 1, 3, 4).reshape(b, kh, t_pad * r_heads, h)  # [B, K, T_p·R, H]
    k_w = jnp.pad(k, ((0, 0), (0, s_pad - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, K, S_p, H]
    v_w = jnp.pad(v, ((0, 0), (0, s_pad - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    meta = {}
    if thr is not None:
        thr = jnp.broadcast_to(thr, (b, kh, r_heads, t_pad)) if bias_rows == 1 else thr
        meta["thr"] = jnp.swapaxes(thr, -1, -2).reshape(b, kh, t_pad * r_heads)  # row t·R + r
    if q_segment_ids is not None:
        meta["qseg"] = jnp.repeat(jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t))), r_heads, 1)
        meta["kseg"] = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad - s)))
    if plan is not None:
        perm, ntab, tile_exit = plan
        inverse = jnp.argsort(perm, axis=-1).astype(jnp.int32)
        k_w, v_w = _permute(k_w, perm, inverse, 2), _permute(v_w, perm, inverse, 2)
        dt_w = _permute(dt_w, perm, inverse, 3)
        meta["kpos"] = jnp.take_along_axis(jnp.broadcast_to(kpos[:, None], perm.shape), perm, axis=-1)
        meta["ntab"], meta["tile_exit"] = ntab, tile_exit
    else:
        meta["kpos"] = kpos[:, None, :]  # [B, 1, S_p]: shared by every kv head

    cfg = _flash.KernelConfig(
        scale=float(scale), block_q=block_q, block_k=block_k, heads_per_kv=r_heads, bias_rows=bias_rows,
        q_offset=offset, sliding_window=sliding_window, chunk=chunk if plan is not None else block_k,
        sparse=plan is not None, has_thr=thr is not None, has_segments=q_segment_ids is not None,
        shared_kpos=plan is None, interpret=bool(interpret), num_warps=num_warps, num_stages=num_stages,
        dkv_warps=dkv_warps)
    o, lse = _flash.fused_attention(cfg, q_rows, k_w, v_w, dt_w, meta)
    out = o.reshape(b, kh, t_pad, r_heads, h).transpose(0, 2, 1, 3, 4).reshape(b, t_pad, n, h)[:, :t]
    if kv_mask is not None or q_segment_ids is not None or sliding_window is not None:
        lse = lse.reshape(b, kh, t_pad, r_heads).transpose(0, 2, 1, 3).reshape(b, t_pad, n)[:, :t]
        out = jnp.where((lse == -jnp.inf)[..., None], _shared.uniform_rows(q, k, v, scale).astype(out.dtype), out)
    return out
