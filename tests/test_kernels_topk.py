"""The top-k bookkeeping of the DMA kernel: exact thresholds, and a sparse walk that reaches every kept key.

These run at sizes the interpret-mode kernel cannot (S up to 16k): they check the plan, not the arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dma_walk import walked_keys
from doge_jax.kernels import topk as _topk


def _brute_thresholds(x: np.ndarray, w: int) -> np.ndarray:
    out = np.full_like(x, -np.inf)
    for p in range(x.shape[-1]):
        top = np.sort(x[..., : p + 1], axis=-1)[..., ::-1]
        if p + 1 >= w:
            out[..., p] = top[..., w - 1]
    return out


@pytest.mark.parametrize("s,w,block,ties", [(300, 7, 32, False), (300, 40, 32, True), (129, 200, 16, False),
                                             (500, 100, 128, True)])
def test_prefix_thresholds_exact(s, w, block, ties):
    rng = np.random.default_rng(s + w)
    x = rng.normal(size=(3, s)).astype(np.float32)
    if ties:
        x = np.round(2 * x) / 2
    x[:, rng.random(s) < 0.2] = -np.inf  # padding / kv_mask=False: not a key
    got = np.asarray(_topk.prefix_thresholds(jnp.asarray(x), w, block=block))
    np.testing.assert_array_equal(got, _brute_thresholds(x, w))


def _kept_per_tile(dtm, thrpos, *, q_offset, n_q_tiles, block_q):
    """[n_q_tiles, S] bool: keys kept by any row of each query tile (causal + valid + dt ≥ thr)."""
    s = dtm.shape[-1]
    kept = np.zeros((n_q_tiles, s), bool)
    for i in range(n_q_tiles):
        for p in range(q_offset + i * block_q, q_offset + (i + 1) * block_q):
            thr = thrpos[min(p, s - 1)]
            kept[i, : p + 1] |= (dtm[: p + 1] >= thr) & np.isfinite(dtm[: p + 1])
    return kept


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "tied"])
def test_sparse_walk_reaches_every_kept_key(ties):
    s, w, bq, bk, chunk, q_offset = 1024, 96, 16, 32, 128, 0
    rng = np.random.default_rng(int(ties))
    dt = rng.normal(size=(1, 1, 1, s)).astype(np.float32)
    if ties:
        dt = np.round(dt)
    dt[..., rng.random(s) < 0.1] = -np.inf
    n_q_tiles = s // bq
    thrpos = _topk.prefix_thresholds(jnp.asarray(dt), w)
    perm, ntab, tile_exit = (np.asarray(a)[0, 0] for a in _topk.sparse_plan(
        thrpos, jnp.asarray(dt), q_offset=q_offset, n_q_tiles=n_q_tiles, block_q=bq, block_k=bk, chunk=chunk))
    kept = _kept_per_tile(dt[0, 0, 0], np.asarray(thrpos)[0, 0, 0], q_offset=q_offset, n_q_tiles=n_q_tiles,
                          block_q=bq)
    slot_of = np.argsort(perm)  # key position → index in the walk order
    keys = np.arange(s)
    chunk_of, tile_of = keys // chunk, slot_of // bk
    np.testing.assert_array_equal(slot_of // chunk, chunk_of)  # the permutation stays inside its chunk
    tiles = np.arange(n_q_tiles)[:, None]
    c_first = (q_offset + tiles * bq) // chunk
    # Forward / dQ walk: an earlier chunk contributes its first ntab[i, c] keys (whole tiles of them).
    in_head = slot_of[None, :] - chunk_of[None, :] * chunk < -(-ntab[:, chunk_of] // bk) * bk
    assert np.all(~kept | (chunk_of[None, :] >= c_first) | in_head)
    # dK/dV walk of a key's tile: query tiles up to the last one overlapping its chunk, or up to its exit.
    i_hi = np.maximum(((chunk_of + 1) * chunk - 1 - q_offset) // bq + 1, tile_exit[tile_of])
    assert np.all(~kept | (tiles < i_hi[None, :]))
    walked = np.asarray(walked_keys(ntab, n_keys=s, q_offset=q_offset, block_q=bq, block_k=bk, chunk=chunk))
    assert np.all(walked >= kept.sum(axis=1))


def test_sparse_walk_reads_far_fewer_keys_at_16k():
    """The point of the sparse walk: at S = 16k with keep_window_size = 2048, a few times fewer keys per tile."""
    s, w, bq, bk = 16384, 2048, 32, 64
    dt = jax.random.uniform(jax.random.key(0), (1, 1, 1, s), jnp.float32)
    chunk = _topk.default_chunk(s, bk)
    thrpos = _topk.prefix_thresholds(dt, w)
    _, ntab, _ = _topk.sparse_plan(thrpos, dt, q_offset=0, n_q_tiles=s // bq, block_q=bq, block_k=bk, chunk=chunk)
    walked = int(walked_keys(ntab, n_keys=s, q_offset=0, block_q=bq, block_k=bk, chunk=chunk).sum())
    dense = sum(-(-(i + 1) * bq // bk) * bk for i in range(s // bq))  # causal key blocks per tile
    assert dense / walked > 2.5, (dense, walked, chunk)
