"""The sparse key walk of the Mosaic-TPU kernel: which key blocks each query tile visits, and the kernel on it.

Counts: the walk tables (`tpu_dma._sparse_tables`, i.e. `topk.walk_plan`) against plain numpy that rebuilds from dt
alone each row's threshold (a sort per row), the keys each query tile keeps, and so the blocks the key layout
must visit; exact equality of every (tile, block) pair, in both walks.
Equality: the kernel on the sparse walk against the reference in TPU interpret mode, the output and the gradients
of q, k, v and dt, at T > keep_window_size with left padding, and with packed segments. Tolerances as
tests/test_kernels_tpu.py (fp32: output 1e-5, gradients 1e-4, relative to the reference's largest entry).
dt is random normal: no two keys tie at a threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_tpu import _check, _inputs, _segments

from doge_jax.kernels import shared, tpu_dma
from doge_jax.model.mask import MaskSpec

# --- plain numpy: kept keys and the blocks a layout must visit ---------------------------------------------------


def _np_needed(dt, allowed, w, block_q):
    """dt [B, K, Gr, S], allowed [B, T, S] → [B, K, n_tiles, S]: keys kept by some row (and bias head) of each tile.

    Row t keeps allowed key s iff dt[s] ≥ its w-th largest allowed dt (every allowed key when it has fewer)."""
    b, kh, gr, s = dt.shape
    t = allowed.shape[1]
    n_tiles = -(-t // block_q)
    kept = np.zeros((b, kh, n_tiles * block_q, s), bool)
    for bi in range(b):
        for row in range(t):
            keys = allowed[bi, row]
            if not keys.any():
                continue
            vals = np.sort(dt[bi][..., keys], axis=-1)[..., ::-1]  # [K, Gr, n]
            thr = vals[..., w - 1] if vals.shape[-1] >= w else np.full((kh, gr), -np.inf)
            kept[bi, :, row] = (keys & (dt[bi] >= thr[..., None])).any(axis=1)
    return kept.reshape(b, kh, n_tiles, block_q, s).any(axis=3)


def _np_visits(needed, perm, block_k, chunk):
    """The (tile, block) pairs the layout `perm` must visit: block u of a chunk from the earliest tile needing a key
    of it or of a later block of the chunk, up to the last tile needing one of its keys (module topk.walk_plan).
    Also checks that perm keeps chunks and orders each by last needing tile (latest first), unneeded keys last."""
    b, kh, n_tiles, s = needed.shape
    alive = needed.any(axis=2)
    enter = np.where(alive, needed.argmax(axis=2), n_tiles)
    exit_ = np.where(alive, n_tiles - needed[:, :, ::-1].argmax(axis=2), 0)
    visits = np.zeros((b, kh, n_tiles, s // block_k), bool)
    for bi in range(b):
        for h in range(kh):
            order = perm[bi, h]
            assert sorted(order.tolist()) == list(range(s))
            np.testing.assert_array_equal(order // chunk, np.arange(s) // chunk)  # keys stay in their chunk
            key = np.stack([np.where(alive[bi, h], -exit_[bi, h], 1), enter[bi, h]])[:, order]
            for c in range(s // chunk):
                seg = key[:, c * chunk:(c + 1) * chunk]
                assert all(tuple(seg[:, u]) <= tuple(seg[:, u + 1]) for u in range(chunk - 1))
            hi = np.where(alive[bi, h], exit_[bi, h], 0)[order].reshape(-1, block_k).max(axis=1)
            lo = enter[bi, h][order].reshape(s // chunk, chunk // block_k, block_k).min(axis=2)
            lo = np.minimum.accumulate(lo[:, ::-1], axis=1)[:, ::-1].reshape(-1)
            tiles = np.arange(n_tiles)[:, None]
            visits[bi, h] = (lo[None] <= tiles) & (tiles < hi[None])
    return visits


def _holding(needed, perm, block_k):
    """[B, K, n_tiles, blocks]: blocks of the layout holding a key the tile keeps."""
    b, kh, n_tiles, s = needed.shape
    in_layout = np.take_along_axis(needed, perm[:, :, None, :], axis=3)
    return in_layout.reshape(b, kh, n_tiles, s // block_k, block_k).any(axis=-1)


def _table_visits(tables, b, kh, n_tiles, n_blocks, per_chunk):
    """The pairs the forward/dQ walk (runs: a prefix of each chunk) and the dK/dV walk (a range of tiles) visit."""
    runs = np.asarray(tables["run_n"]).reshape(b, kh, n_tiles, -1)
    u = np.arange(per_chunk)
    fwd = (u < runs[..., None]).reshape(b, kh, n_tiles, n_blocks)
    lo, n = (np.asarray(tables[k]).reshape(b, kh, n_blocks) for k in ("q_lo", "q_n"))
    tiles = np.arange(n_tiles)[:, None]
    dkv = (lo[:, :, None] <= tiles) & (tiles < (lo + n)[:, :, None])
    return fwd, dkv


def _plan(dt, mask, *, kh, t, s, block_q, block_k, chunk):
    """The sparse tables dma_pallas_tpu builds for dt [B, G, S] (S a multiple of chunk) with K = kh kv heads."""
    b, g, _ = dt.shape
    valid = jnp.ones((b, s), bool) if mask.kv_mask is None else mask.kv_mask
    dt_w = dt.astype(jnp.float32).reshape(b, kh, g // kh, s)
    thr, _, _ = shared.topk_setup(dt, dt_w, valid, mask, t=t, t_pad=-(-t // block_q) * block_q, block_q=block_q,
                                  block_k=block_k, sparse=False, chunk=None)
    perm, tables = tpu_dma._sparse_tables(thr=thr, dt_w=dt_w, valid=valid, mask=mask, t=t, block_q=block_q,
                                          block_k=block_k, chunk=chunk)
    return np.asarray(perm), tables


PLANS = {  # (B, K, S, keep_window_size, block_q, block_k, chunk, mask); T = S − q_offset
    "prefill_after_cache": (1, 2, 768, 48, 32, 128, 256, {"offset": 128}),
    "left_padding": (2, 1, 768, 48, 64, 128, 256, {"pad": [0, 300]}),
    "segments": (2, 1, 768, 48, 64, 128, 256, {"pad": [0, 100], "segments": [[200, 610], [300, 301, 500]]}),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_walk_visits_exactly_the_blocks_numpy_expects(name):
    """Both walks visit the same (tile, block) pairs, exactly those numpy derives from the thresholds; every
    block holding a kept key is among them, and the band's other blocks are skipped."""
    b, kh, s, w, bq, bk, chunk, kw = PLANS[name]
    offset = kw.get("offset", 0)
    t = s - offset
    dt = jax.random.normal(jax.random.key(list(PLANS).index(name)), (b, kh, s), jnp.float32)
    mask_kw = dict(keep_window_size=w, q_offset=offset)
    if "pad" in kw:
        mask_kw["kv_mask"] = jnp.arange(s)[None, :] >= jnp.array(kw["pad"])[:, None]
    if "segments" in kw:
        seg = _segments(b, s, kw["segments"])
        mask_kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    mask = MaskSpec(**mask_kw)
    perm, tables = _plan(dt, mask, kh=kh, t=t, s=s, block_q=bq, block_k=bk, chunk=chunk)

    allowed = np.asarray(mask.allowed(b, t, s))
    needed = _np_needed(np.asarray(dt)[:, :, None, :], allowed, w, bq)  # [B, K, n_tiles, S]
    expected = _np_visits(needed, perm, bk, chunk)
    n_tiles = needed.shape[2]
    fwd, dkv = _table_visits(tables, b, kh, n_tiles, s // bk, chunk // bk)
    np.testing.assert_array_equal(fwd, expected)
    np.testing.assert_array_equal(dkv, expected)
    holding = _holding(needed, perm, bk)
    assert not (holding & ~fwd).any()
    causal = np.arange(n_tiles)[:, None] * bq + bq - 1 + offset >= np.arange(s // bk)[None] * bk
    print(f"{name}: visited {fwd.sum()}, holding kept keys {holding.sum()}, causal band {b * kh * causal.sum()}")
    assert fwd.sum() <= 1.25 * holding.sum()
    assert fwd.sum() < 0.8 * b * kh * causal.sum()


def _prefix_thresholds_np(dt, w):
    """w-th largest of dt[:p + 1] for every p (−inf before w keys): a running sort, independent of topk.py."""
    out = np.full(dt.shape, -np.inf, np.float32)
    top = np.empty(0, np.float32)
    for p, x in enumerate(dt):
        top = np.insert(top, np.searchsorted(top, x), x)[-w:]
        if len(top) == w:
            out[p] = top[0]
    return out


def test_walk_at_16k_visits_at_most_a_quarter_more_blocks_than_hold_kept_keys():
    """T = 16k, keep_window_size = 2048, the default tiles of a doge_160m layer (256 positions × R = 2, 128-key
    blocks): blocks visited ≤ 1.25× the blocks holding kept keys, and ≥ 3× fewer key-block FLOPs than the band
    walk at its own default 512-key blocks (benchmarks/tpu_roofline.py prints both)."""
    s, w, r_heads = 16384, 2048, 2
    bq, bk = tpu_dma._block_sizes(s, s, r_heads, None, None, sparse=True)
    chunk = tpu_dma._topk.default_chunk(s, bk)
    dt = jax.random.normal(jax.random.key(7), (1, 1, s), jnp.float32)
    perm, tables = _plan(dt, MaskSpec(keep_window_size=w), kh=1, t=s, s=s, block_q=bq, block_k=bk, chunk=chunk)
    thr = _prefix_thresholds_np(np.asarray(dt)[0, 0], w)
    n_tiles = s // bq
    d, keys = np.asarray(dt)[0, 0], np.arange(s)
    # Tile i keeps key s ≤ its last row iff dt[s] ≥ thr of the tile's first row that may see s (thr never falls).
    needed = np.stack([(keys < (i + 1) * bq) & (d >= thr[np.maximum(keys, i * bq)]) for i in range(n_tiles)])
    holding = _holding(needed[None, None], perm, bk)
    fwd, dkv = _table_visits(tables, 1, 1, n_tiles, s // bk, chunk // bk)
    assert not (holding & ~fwd).any() and (fwd == dkv).all()
    band_512 = sum(-(-(i + 1) * bq // 512) for i in range(n_tiles))
    print(f"16k: visited {fwd.sum()}, holding {holding.sum()}, band {band_512} blocks of 512")
    assert fwd.sum() <= 1.25 * holding.sum()
    assert fwd.sum() * bk * 3 <= band_512 * 512


# --- the kernel on the sparse walk --------------------------------------------------------------------------------

CASES = {  # shapes and mask; tiles of 64 positions × 128 keys, chunks of 2 blocks: the walk has blocks to skip
    "left_padding_gqa": (dict(B=2, T=512, S=512, N=4, K=2, G=2, H=64), dict(keep_window_size=32, pad=[0, 150])),
    "segments_bias_per_query_head": (dict(B=2, T=512, S=512, N=4, K=2, G=4, H=64),
                                     dict(keep_window_size=32, pad=[0, 40], segments=[[150, 330], [60, 61, 300]])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_walk_matches_reference(name):
    """Output and gradients on the sparse walk; the walk visits under 3/4 of the causal band's blocks, so a
    missing block would show."""
    shapes, kw = CASES[name]
    B, S, K, H = shapes["B"], shapes["S"], shapes["K"], shapes["H"]
    args, do = _inputs(20 + list(CASES).index(name), **shapes)
    mask_kw = dict(keep_window_size=kw["keep_window_size"],
                   kv_mask=jnp.arange(S)[None, :] >= jnp.array(kw["pad"])[:, None])
    if "segments" in kw:
        seg = _segments(B, S, kw["segments"])
        mask_kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    tiles = dict(block_q=64, block_k=128, chunk=256)
    _, tables = _plan(args[3], MaskSpec(**mask_kw), kh=K, t=S, s=S, **tiles)
    visited, band = int(np.asarray(tables["run_n"]).sum()), B * K * sum(i // 2 + 1 for i in range(S // 64))
    print(f"{name}: visits {visited} of the band's {band} (tile, block) pairs")
    assert visited < 0.75 * band
    _check(args, do, dict(mask_kw, scale=H ** -0.5), dict(tiles, sparse=True))
