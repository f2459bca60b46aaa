"""DMA's top-k without a [T, S] mask: per-row thresholds, and the key order that lets the kernel skip dropped keys.

The rule (doge_jax.model.mask.masked_bias): row t keeps an allowed key s iff dt[s] ≥ thr[t], where thr[t] is the
keep_window_size-th (w-th) largest dt over the row's allowed keys, or −inf when the row has fewer than w of them.
Every key tied with thr[t] is kept, exactly as the reference; torch.topk would keep an arbitrary w of them instead
(the two differ only when dt has ties at the threshold: at initialisation A = 0 makes every dt equal, and then the
reference, and this kernel, keep every allowed key).

Causal masks with padding ("prefix" masks: allowed(t) = valid keys at positions ≤ q_offset + t) have structure:
- thr is a running order statistic of a growing prefix, so `prefix_thresholds` computes it for every position from
  one sort, without a [T, S] array.
- For a query tile i starting at position p0_i, thrX_i = thr[p0_i − 1] (the w-th largest key before the tile) is a
  lower bound of every row's threshold in the tile and is non-decreasing in i. A key s < p0_i can be kept by the
  tile only if dt[s] ≥ thrX_i, so it is useful to tiles i < exit[s] (the first tile whose thrX exceeds dt[s]) and
  never again. `sparse_plan` sorts the keys of each chunk of L positions by exit, latest first: tile i then needs
  only the first ntab[i, c] keys of every chunk c that lies before it (ntab[i, c] = #{s ∈ c : exit[s] > i}), and
  the chunk(s) it overlaps in full. About w + (S / L)·block_k/2 + L keys per tile instead of ~S/2.
Other masks (packed segments, a sliding window longer than w) use `general_thresholds`: exact, chunked over
queries, O(T·S) work, and the kernel then walks every causal key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from doge_jax.model.mask import MaskSpec

NEG_INF = float("-inf")


def _prefix_kth_largest(x: jax.Array, w: int, m: int) -> jax.Array:
    """x [S] (S a multiple of m; −inf = no key) → [S]: the w-th largest of x[:p + 1] for every p, −inf if fewer.

    Blocks of m positions: A = ranks w−1−m … w−1 of the sorted prefix before the block (one cumsum over the global
    sort per block), then each position merges A with the ≤ m sorted block values up to it. The w-th largest of
    the union of two sorted lists is max_c min(A_(w−c), B_(c)), c keys taken from the block (A_(0) = B_(0) = +inf).
    """
    s = x.shape[0]
    n_blocks = s // m
    order = jnp.argsort(-x, stable=True)  # descending; −inf last
    vals = x[order]
    starts = jnp.arange(n_blocks) * m
    in_prefix = order[None, :] < starts[:, None]  # [n_blocks, S]
    rank = jnp.cumsum(in_prefix, axis=1, dtype=jnp.int32) - 1
    slot = (w - 1) - rank  # c: the key is A_(w−c) of this block
    slot = jnp.where(in_prefix & (slot >= 0) & (slot <= m), slot, m + 1)
    tail = jnp.full((n_blocks, m + 1), NEG_INF, x.dtype)
    tail = tail.at[jnp.arange(n_blocks)[:, None], slot].set(jnp.broadcast_to(vals, slot.shape), mode="drop")
    c = jnp.arange(m + 1)
    tail = jnp.where(c[None, :] > w - 1, jnp.inf, tail)  # A_(w−c) with w−c ≤ 0: +inf
    blk = x.reshape(n_blocks, m)
    u = jnp.arange(m)
    upto = jnp.where(u[None, None, :] <= u[None, :, None], blk[:, None, :], NEG_INF)  # [n_blocks, m (p), m (s)]
    upto = -jnp.sort(-upto, axis=-1)  # B_(1..m) of each position
    upto = jnp.concatenate([jnp.full((n_blocks, m, 1), jnp.inf, x.dtype), upto], axis=-1)  # B_(0) = +inf
    kth = jnp.max(jnp.minimum(tail[:, None, :], upto), axis=-1)  # [n_blocks, m]
    return kth.reshape(s)


def prefix_thresholds(dtm: jax.Array, w: int, *, block: int = 128, batch: int = 4) -> jax.Array:
    """dtm [..., S] fp32 with −inf where there is no key → [..., S]: w-th largest of dtm[..., :p + 1] per position p.

    Exact (ties included). Memory O(S²/block + S·block) per row, rows mapped `batch` at a time.
    """
    *lead, s = dtm.shape
    m = min(block, s)
    s_pad = -(-s // m) * m
    x = jnp.pad(dtm.reshape(-1, s), ((0, 0), (0, s_pad - s)), constant_values=NEG_INF)
    out = jax.lax.map(lambda row: _prefix_kth_largest(row, w, m), x, batch_size=min(batch, x.shape[0]))
    return out[:, :s].reshape(*lead, s)


def general_thresholds(dt: jax.Array, q_len: int, mask: MaskSpec, *, chunk: int = 128) -> jax.Array:
    """Any mask: dt [B, G, S] → thr [B, G, T], −inf for rows with fewer than keep_window_size allowed keys.

    The reference's top_k, one chunk of query rows at a time: exact, O(T·S·log w) work, [B, G, chunk, S] memory.
    `mask.q_offset` must be static (an int).
    """
    b, g, s = dt.shape
    w = mask.keep_window_size
    chunk = min(chunk, q_len)
    n_chunks = -(-q_len // chunk)
    qseg = None
    if mask.q_segment_ids is not None:
        qseg = jnp.pad(mask.q_segment_ids, ((0, 0), (0, n_chunks * chunk - q_len)))

    def one(c):
        seg_c = None if qseg is None else jax.lax.dynamic_slice_in_dim(qseg, c * chunk, chunk, axis=1)
        rows = mask.replace(q_offset=mask.static_offset + c * chunk, q_segment_ids=seg_c,
                            kv_segment_ids=mask.kv_segment_ids if seg_c is not None else None)
        allowed = rows.allowed(b, chunk, s)  # [B, chunk, S]
        m = jnp.where(allowed[:, None], dt[:, :, None, :], NEG_INF)  # [B, G, chunk, S]
        return jax.lax.top_k(m, w)[0][..., -1]  # [B, G, chunk]

    thr = jax.lax.map(one, jnp.arange(n_chunks))  # [n_chunks, B, G, chunk]
    return jnp.moveaxis(thr, 0, 2).reshape(b, g, n_chunks * chunk)[..., :q_len]


def default_chunk(n_keys: int, block_k: int) -> int:
    """L ≈ sqrt(S·block_k) balances the per-chunk tail waste (S/L · block_k/2) against the own chunk (L/2)."""
    blocks = max(1, 2 ** round(math.log2(max(1.0, math.sqrt(n_keys / block_k)))))
    return block_k * min(blocks, -(-n_keys // block_k))


def sparse_plan(
    thrpos: jax.Array, dtm: jax.Array, *, q_offset: int, n_q_tiles: int, block_q: int, block_k: int, chunk: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The key order and visit counts of the sparse walk.

    thrpos, dtm [B, K, Gr, S] (thresholds per position, dt with −inf for invalid keys; Gr bias rows per kv head).
    Returns perm [B, K, S] (keys by chunk, then exit latest first), ntab [B, K, n_q_tiles, n_chunks] (keys of each
    chunk that tile i walks) and tile_exit [B, K, S / block_k] (first tile no longer needing each block of the
    permuted order, which the dK/dV pass uses as its loop bound).
    """
    s = dtm.shape[-1]
    p0 = q_offset + jnp.arange(n_q_tiles) * block_q
    before = jnp.take(thrpos, jnp.clip(p0 - 1, 0, s - 1), axis=-1)
    thr_x = jnp.where(p0 > 0, before, NEG_INF)  # [B, K, Gr, n_q_tiles], non-decreasing
    search = jnp.vectorize(lambda a, v: jnp.searchsorted(a, v, side="right"), signature="(n),(s)->(s)")
    exit_ = search(thr_x, dtm).astype(jnp.int32)  # tiles i with thr_x[i] ≤ dt[s]
    exit_ = jnp.where(dtm == NEG_INF, 0, exit_).max(axis=2)  # [B, K, S]: a key any head of the group may keep
    chunk_of = jnp.arange(s, dtype=jnp.int32) // chunk
    perm = jnp.argsort(chunk_of * (n_q_tiles + 1) + (n_q_tiles - exit_), axis=-1, stable=True).astype(jnp.int32)
    tile_exit = jnp.take_along_axis(exit_, perm, axis=-1)[..., ::block_k]
    n_chunks = -(-s // chunk)
    b, k = exit_.shape[:2]
    hist = jnp.zeros((b, k, n_chunks, n_q_tiles + 1), jnp.int32)
    hist = hist.at[jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], chunk_of, exit_].add(1)
    # ntab[i, c] = #{s ∈ c : exit[s] > i}
    ntab = jnp.flip(jnp.cumsum(jnp.flip(hist, -1), axis=-1), -1)[..., 1:]  # [B, K, n_chunks, n_q_tiles]
    return perm, jnp.swapaxes(ntab, -1, -2), tile_exit


# --- the TPU kernel's block walk: which key blocks each query tile visits ------------------------------------------
#
# A key s is needed by query tile i iff some row p of the tile may see it and keeps it (dt[s] ≥ thr[p]). For every
# mask the kernel takes, the tiles needing s lie inside one interval [enter[s], exit[s]) (empty when exit ≤ enter:
# no row ever keeps s). `walk_plan` lays the keys out so that the keys a tile needs share few key blocks, and
# describes each walk by block counts that the kernels read from SMEM.


def prefix_key_intervals(dtm: jax.Array, thr: jax.Array, *, q_offset: int, q_len: int, block_q: int,
                         ) -> tuple[jax.Array, jax.Array]:
    """Causal / padding masks: the exact tile interval of every key.

    dtm [B, K, Gr, S] (−inf for a key that is not there), thr [B, K, Gr, T_p] per query row (non-decreasing: the
    w-th largest of a growing prefix). Returns enter, exit [B, K, S] int32.
    The first row that may keep key s is p* = max(s, q_offset), the best one since thr never decreases; if it does
    not keep s, no row does. Otherwise s is needed from p*'s tile to the last tile whose first row keeps it, and
    the first rows' thresholds are sorted, so that is one searchsorted.
    """
    n_tiles = -(-q_len // block_q)
    s = dtm.shape[-1]
    pos = jnp.arange(s)
    row = jnp.maximum(pos - q_offset, 0)  # row index of p*
    visible = pos < q_offset + q_len
    own_thr = jnp.take(thr, jnp.minimum(row, q_len - 1), axis=-1)  # [B, K, Gr, S]
    kept = visible & (dtm > NEG_INF) & (dtm >= own_thr)
    thr_first = thr[..., : n_tiles * block_q : block_q]  # [B, K, Gr, n_tiles], non-decreasing
    search = jnp.vectorize(lambda a, v: jnp.searchsorted(a, v, side="right"), signature="(n),(s)->(s)")
    last = search(thr_first, dtm)  # tiles whose first row keeps s
    exit_ = jnp.where(kept, last, 0).max(axis=2).astype(jnp.int32)
    enter = jnp.where(kept.any(axis=2), row // block_q, n_tiles).astype(jnp.int32)
    return enter, exit_


def general_key_intervals(dt_w: jax.Array, thr: jax.Array, valid: jax.Array, mask: MaskSpec, *, q_len: int,
                          block_q: int) -> tuple[jax.Array, jax.Array]:
    """Any mask (segments, sliding window): enter, exit [B, K, S] int32 spanning every tile that needs each key.

    dt_w [B, K, Gr, S] fp32, thr [B, K, Gr, T_p], valid [B, S]. One pass over the query tiles, each testing its
    rows against every key: O(T·S) work, like `general_thresholds` before it. enter = first tile needing the key,
    exit = 1 + the last (a superset of the needing tiles when segments are not contiguous runs).
    """
    b, kh, _, s = dt_w.shape
    n_tiles = -(-q_len // block_q)
    offset = mask.static_offset
    qseg = kseg = None
    if mask.q_segment_ids is not None:
        qseg = jnp.pad(mask.q_segment_ids, ((0, 0), (0, n_tiles * block_q - q_len)))
        kseg = jnp.pad(mask.kv_segment_ids, ((0, 0), (0, s - mask.kv_segment_ids.shape[1])))
    pos = jnp.arange(s)

    def step(carry, i):
        enter, exit_ = carry
        t = i * block_q + jnp.arange(block_q)
        p = offset + t  # [bq]
        allowed = (pos[None, :] <= p[:, None]) & (t < q_len)[:, None] & valid[:, None, :]  # [B, bq, S]
        if mask.sliding_window is not None:
            allowed &= pos[None, :] > p[:, None] - mask.sliding_window
        if qseg is not None:
            seg = jax.lax.dynamic_slice_in_dim(qseg, i * block_q, block_q, axis=1)
            allowed &= seg[:, :, None] == kseg[:, None, :]
        thr_i = jax.lax.dynamic_slice_in_dim(thr, i * block_q, block_q, axis=3)  # [B, K, Gr, bq]
        keeps = dt_w[:, :, :, None, :] >= thr_i[..., None]  # [B, K, Gr, bq, S]
        need = (keeps & allowed[:, None, None]).any(axis=(2, 3))  # [B, K, S]
        enter = jnp.where(need & (enter == n_tiles), i, enter)
        exit_ = jnp.where(need, i + 1, exit_)
        return (enter, exit_), None

    init = (jnp.full((b, kh, s), n_tiles, jnp.int32), jnp.zeros((b, kh, s), jnp.int32))
    (enter, exit_), _ = jax.lax.scan(step, init, jnp.arange(n_tiles, dtype=jnp.int32))
    return enter, exit_


def walk_plan(enter: jax.Array, exit_: jax.Array, *, n_tiles: int, block_k: int, chunk: int):
    """The key layout and both walks of the TPU kernel's sparse mode, from the keys' tile intervals.

    enter, exit_ [B, K, S] (S a multiple of chunk, chunk of block_k). Keys stay inside their chunk of `chunk`
    positions and are sorted there by exit, latest first (then by enter), keys no tile needs last. Key block u of a
    chunk is then needed by tiles [lo_u, hi_u) with hi_u = the exit of its first key (non-increasing in u) and lo_u
    = the earliest enter in it or any later block of the chunk (non-decreasing): the blocks tile i visits in a
    chunk are a prefix of it, and the tiles visiting a block are a contiguous range. Returns
      perm    [B, K, S]              key position at each slot of the layout
      runs_n  [B, K, n_tiles, n_ch]  blocks visited in each chunk by each query tile (forward, dQ)
      q_lo, q_n [B, K, S / block_k]  the range of query tiles visiting each block (dK/dV/d-bias)
    Both walks visit the same (tile, block) pairs, a superset of the pairs holding a needed key.
    """
    b, kh, s = enter.shape
    n_chunks, per = s // chunk, chunk // block_k
    if (n_tiles + 2) ** 2 >= 2**31:
        raise ValueError(f"walk_plan: n_tiles={n_tiles} must be below 46339 (the sort key is int32)")
    alive = exit_ > enter
    by_exit = jnp.where(alive, n_tiles - exit_, n_tiles + 1)
    by_enter = jnp.where(alive, enter, n_tiles)
    key = (by_exit * (n_tiles + 2) + by_enter).reshape(b, kh, n_chunks, chunk)
    # One sort per chunk rather than a lexsort over S: the same order, and XLA:TPU compiles it ~10× faster.
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    perm = (order + (jnp.arange(n_chunks, dtype=jnp.int32) * chunk)[:, None]).reshape(b, kh, s)
    blocks = (b, kh, n_chunks, per, block_k)
    hi = jnp.take_along_axis(jnp.where(alive, exit_, 0), perm, axis=-1).reshape(blocks).max(-1)
    lo = jnp.take_along_axis(by_enter, perm, axis=-1).reshape(blocks).min(-1)
    lo = jnp.flip(jax.lax.cummin(jnp.flip(lo, -1), axis=lo.ndim - 1), -1)  # min over the block and later ones
    tiles = jnp.arange(n_tiles)[:, None, None]
    visit = (lo[:, :, None] <= tiles) & (tiles < hi[:, :, None])  # [B, K, n_tiles, n_chunks, per]
    runs_n = visit.sum(-1, dtype=jnp.int32)
    q_n = jnp.maximum(hi - lo, 0).reshape(b, kh, n_chunks * per).astype(jnp.int32)
    q_lo = jnp.minimum(lo, n_tiles - 1).reshape(b, kh, n_chunks * per).astype(jnp.int32)
    return perm, runs_n, q_lo, q_n
