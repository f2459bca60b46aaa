"""The Pallas DMA kernel against the reference, in interpret mode on CPU: the output and every gradient.

Tolerances (fp32, random inputs of O(1)): output |Δ| ≤ 1e-5; each gradient |Δ| ≤ 1e-4 · max(1, max|reference|)
(the dt gradient sums over every query row of a group, so it is compared relative to its size).
Shapes are small (T ≤ 300) because interpret mode runs the grid as a scan; lengths are not multiples of the tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doge_jax.kernels.gpu_dma import dma_pallas_gpu
from doge_jax.model.dma_reference import dma_reference
from doge_jax.model.mask import MaskSpec

OUT_ATOL = 1e-5
GRAD_RTOL = 1e-4


def _inputs(seed, *, B, T, S, N, K, G, H, dt_values=None):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32)
    dt = jax.random.normal(ks[3], (B, G, S), jnp.float32) if dt_values is None else dt_values
    do = jax.random.normal(ks[4], (B, T, N, H), jnp.float32)
    return (q, k, v, dt), do


def reference(q, k, v, dt, *, scale, dropout_rate=0.0, dropout_rng=None, **mask_kw):
    return dma_reference(q, k, v, dt, MaskSpec(**mask_kw), scale=scale, dropout_rate=dropout_rate,
                         dropout_rng=dropout_rng)


def dma_pallas(q, k, v, dt, *, scale, interpret=True, block_q=None, block_k=None, sparse=None, chunk=None,
               **mask_kw):
    return dma_pallas_gpu(q, k, v, dt, MaskSpec(**mask_kw), scale=scale, interpret=interpret, block_q=block_q,
                          block_k=block_k, sparse=sparse, chunk=chunk)


def _value_and_grads(fn, args, do):
    out, vjp = jax.vjp(jax.jit(fn), *args)
    return out, vjp(do)


def _check(args, do, mask_kw, kernel_kw):
    ref_out, ref_grads = _value_and_grads(lambda *a: reference(*a, **mask_kw), args, do)
    out, grads = _value_and_grads(lambda *a: dma_pallas(*a, **mask_kw, interpret=True, **kernel_kw), args, do)
    np.testing.assert_allclose(out, ref_out, atol=OUT_ATOL, rtol=0)
    for name, g, ref in zip(("dq", "dk", "dv", "ddt"), grads, ref_grads):
        tol = GRAD_RTOL * max(1.0, float(jnp.max(jnp.abs(ref))))
        np.testing.assert_allclose(g, ref, atol=tol, rtol=0, err_msg=name)


# (shapes, mask/top-k arguments, kernel tiling). block_q counts query positions: a tile holds block_q·N/K rows.
CASES = {
    "mha_h64_no_topk": (dict(B=2, T=100, S=100, N=2, K=2, G=2, H=64), dict(keep_window_size=256),
                        dict(block_q=32, block_k=32)),
    "gqa2_h128_topk_dense_walk": (dict(B=1, T=160, S=160, N=4, K=2, G=2, H=128), dict(keep_window_size=96),
                                  dict(block_q=16, block_k=32)),
    "gqa4_topk_sparse_walk": (dict(B=1, T=300, S=300, N=8, K=2, G=2, H=64), dict(keep_window_size=64),
                              dict(block_q=8, block_k=32)),
    "gqa2_bias_per_query_head_sparse": (dict(B=1, T=200, S=200, N=4, K=2, G=4, H=64), dict(keep_window_size=48),
                                        dict(block_q=16, block_k=32, chunk=64)),
    "packed_segments_topk": (dict(B=2, T=150, S=150, N=4, K=2, G=2, H=64), dict(keep_window_size=24),
                             dict(block_q=16, block_k=32)),
    "sliding_window_topk": (dict(B=1, T=150, S=150, N=4, K=4, G=4, H=64),
                            dict(keep_window_size=24, sliding_window=64), dict(block_q=32, block_k=32)),
    "prefill_after_cache": (dict(B=2, T=60, S=130, N=4, K=2, G=2, H=64), dict(keep_window_size=32, q_offset=40),
                            dict(block_q=16, block_k=32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    shapes, mask_kw, kernel_kw = CASES[name]
    args, do = _inputs(list(CASES).index(name), **shapes)
    mask_kw = dict(mask_kw, scale=shapes["H"] ** -0.5)
    B, T, S = shapes["B"], shapes["T"], shapes["S"]
    if name == "packed_segments_topk":
        starts = np.zeros((B, T), np.int32)
        starts[0, [37, 90]] = 1
        starts[1, [5, 120]] = 1
        seg = jnp.asarray(np.cumsum(starts, axis=1))
        mask_kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    if name == "prefill_after_cache":  # cache slots [0, 100) filled: the 60 queries sit at positions 40..99
        mask_kw.update(kv_mask=jnp.broadcast_to(jnp.arange(S) < 100, (B, S)))
    _check(args, do, mask_kw, kernel_kw)


def test_left_padded_batch_including_rows_with_no_key():
    """Left padding: rows before the first token have no allowed key; the reference averages all S values there
    (and differentiates through that flat softmax). Compared everywhere, with a cotangent on the padded rows too."""
    shapes = dict(B=2, T=200, S=200, N=4, K=2, G=2, H=64)
    args, do = _inputs(3, **shapes)
    kv_mask = jnp.arange(200)[None, :] >= jnp.array([[0], [37]])
    mask_kw = dict(scale=0.125, keep_window_size=48, kv_mask=kv_mask)
    _check(args, do, mask_kw, dict(block_q=16, block_k=32, sparse=True, chunk=64))


def test_tied_bias_keeps_every_tied_key():
    """A = 0 at initialisation makes every dt equal: the threshold ties with every key, and all of them are kept
    (torch.topk would keep an arbitrary keep_window_size of them). So top-k changes nothing, as in the reference."""
    shapes = dict(B=1, T=200, S=200, N=4, K=2, G=2, H=64)
    args, do = _inputs(4, **shapes, dt_values=jnp.ones((1, 2, 200), jnp.float32))
    mask_kw = dict(scale=0.125, keep_window_size=40)
    _check(args, do, mask_kw, dict(block_q=16, block_k=32, sparse=True, chunk=64))
    q, k, v, dt = args
    no_topk = reference(q, k, v, dt, scale=0.125, keep_window_size=200)
    np.testing.assert_allclose(dma_pallas(q, k, v, dt, **mask_kw, interpret=True), no_topk, atol=OUT_ATOL, rtol=0)


def test_partially_tied_bias():
    """dt on a coarse grid: many ties at each row's threshold, all kept, through the sparse walk."""
    shapes = dict(B=1, T=180, S=180, N=4, K=2, G=2, H=64)
    dt = jnp.round(2 * jax.random.normal(jax.random.key(9), (1, 2, 180))) / 2
    args, do = _inputs(5, **shapes, dt_values=dt)
    _check(args, do, dict(scale=0.125, keep_window_size=32), dict(block_q=16, block_k=32, sparse=True, chunk=64))


def test_refuses_decoding_offsets_in_one_line():
    """A traced or per-batch q_offset (decoding with a cache) is not the kernel's: it says so instead of falling
    back (the dispatcher, doge_jax.model.attention_impl, decides what runs instead)."""
    (q, k, v, dt), _ = _inputs(6, B=2, T=1, S=40, N=4, K=2, G=2, H=64)
    kw = dict(scale=0.125, keep_window_size=16, kv_mask=jnp.arange(40)[None, :] <= jnp.array([[20], [30]]))
    with pytest.raises(ValueError, match=r"^dma_pallas_gpu cannot run a traced or per-batch q_offset"):
        dma_pallas(q, k, v, dt, q_offset=jnp.array([20, 30]), **kw)
    with pytest.raises(ValueError, match="traced or per-batch q_offset"):
        jax.jit(lambda off: dma_pallas(q, k, v, dt, q_offset=off, **kw))(jnp.int32(20))


@pytest.mark.parametrize("cast", ["k", "v"])
def test_refuses_mixed_qkv_dtypes_in_one_line(cast):
    """Triton's dot takes one input type: mixed q/k/v dtypes are refused before anything is traced, as on TPU."""
    (q, k, v, dt), _ = _inputs(8, B=1, T=16, S=16, N=2, K=1, G=1, H=16)
    q = q.astype(jnp.bfloat16)
    k, v = (k, v.astype(jnp.bfloat16)) if cast == "k" else (k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match=r"^dma_pallas_gpu: q/k/v dtypes bfloat16/\w+/\w+ must be equal: cast") as e:
        dma_pallas(q, k, v, dt, scale=0.25, keep_window_size=8)
    assert "\n" not in str(e.value) and "float32" in str(e.value)


def test_bfloat16_inputs():
    """bf16 q/k/v (the training dtype): fp32 scores and softmax, probabilities rounded to bf16 before p·v."""
    shapes = dict(B=1, T=130, S=130, N=4, K=2, G=2, H=64)
    (q, k, v, dt), _ = _inputs(7, **shapes)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    kw = dict(scale=0.125, keep_window_size=40)
    out = jax.jit(lambda *a: dma_pallas(*a, **kw, interpret=True, block_q=16, block_k=32))(q, k, v, dt)
    ref = reference(q, k, v, dt, **kw)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), atol=3e-2, rtol=0)


@pytest.mark.parametrize("walk", ["dense", "sparse"])
def test_the_tile_table_is_what_runs_and_matches_the_reference(walk):
    """gpu_tiles.TABLE's head-dim-128 tiles (what every preset runs on a GPU: 64 rows × 64 keys dense, 128 rows
    × 32 keys on the sparse walk) are the defaults, and give the reference's output and gradients."""
    from doge_jax.kernels import gpu_dma, gpu_tiles

    w = 48 if walk == "sparse" else 256
    mask = MaskSpec(keep_window_size=w)
    sparse = gpu_dma._sparse_walk(mask, 200, None)
    assert sparse == (walk == "sparse")
    tiles = gpu_tiles.TABLE[128, walk]
    assert gpu_dma._tiles(4, 2, 128, sparse, None, None, None, None) == (
        tiles.rows // 2, tiles.block_k, tiles.num_warps, tiles.num_stages, tiles.dkv_warps or tiles.num_warps)
    assert gpu_dma._tiles(4, 2, 128, sparse, 8, 16, 2, 1) == (8, 16, 2, 1, 2)  # the caller's tiles win
    args, do = _inputs(7, B=1, T=200, S=200, N=4, K=2, G=2, H=128)
    _check(args, do, dict(keep_window_size=w, scale=128**-0.5), {})


def test_tile_table_lookup_falls_back_to_the_nearest_head_dim():
    from doge_jax.kernels import gpu_tiles

    assert gpu_tiles.choose(32, sparse=False) == gpu_tiles.TABLE[64, "dense"]
    assert gpu_tiles.choose(96, sparse=True) == gpu_tiles.TABLE[128, "sparse"]
    assert gpu_tiles.choose(512, sparse=False) == gpu_tiles.TABLE[256, "dense"]
    assert gpu_tiles.Tiles(64, 64, 4, 2).block_q(128) == 1
