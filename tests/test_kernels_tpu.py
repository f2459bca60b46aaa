"""The Mosaic-TPU DMA kernel against the reference, in TPU interpret mode on CPU: the output and every gradient.

Tolerances (fp32, random inputs of O(1), relative = max|Δ| / max|reference|): output ≤ 1e-5, each of dq, dk, dv,
ddt ≤ 1e-4 (ddt sums over every query row of a group, so it is judged relative to its own size).
bf16 q/k/v: the kernel and the bf16 reference are both judged against the fp32 reference of the same inputs; the
kernel's error must stay within 2× the bf16 reference's own error + 1e-2 (output) / + 2e-2 (gradients).
dt is random normal (no ties at any row's threshold); lengths are not multiples of the tiles. Interpret mode runs
the grid step by step, so shapes are small (T ≤ 512) and tiles are the smallest TPU-legal ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import doge_jax
from doge_jax.kernels import tpu_dma
from doge_jax.model import attention_impl
from doge_jax.model import decoder as model_lib
from doge_jax.model.dma_reference import dma_reference
from doge_jax.model.mask import MaskSpec

OUT_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _rel(x, ref) -> float:
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.max(jnp.abs(x - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def _inputs(seed, *, B, T, S, N, K, G, H, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32)
    dt = jax.random.normal(ks[3], (B, G, S), jnp.float32)
    do = jax.random.normal(ks[4], (B, T, N, H), jnp.float32)
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype), dt), do.astype(dtype)


class _Dma:
    """The reference and the kernel with the mask given as keywords (a MaskSpec underneath)."""

    @staticmethod
    def dynamic_mask_attention(q, k, v, dt, *, scale, **mask_kw):
        return dma_reference(q, k, v, dt, MaskSpec(**mask_kw), scale=scale)

    @staticmethod
    def attention_mask(b, t, s, **mask_kw):
        return MaskSpec(keep_window_size=1, **mask_kw).allowed(b, t, s)


dma = _Dma()
_KERNEL_KW = ("interpret", "block_q", "block_k", "sparse", "chunk")


def dma_pallas_tpu(q, k, v, dt, *, scale, **kw):
    kernel_kw = {name: kw.pop(name) for name in _KERNEL_KW if name in kw}
    return tpu_dma.dma_pallas_tpu(q, k, v, dt, MaskSpec(**kw), scale=scale, **kernel_kw)


def tpu_unsupported_reason(*, dropout_rate=0.0, q_offset=0, head_dim, dtype=jnp.float32):
    q = jnp.zeros((1, 1, 2, head_dim), dtype)
    k = jnp.zeros((1, 4, 1, head_dim), dtype)
    return tpu_dma.tpu_unsupported_reason(q, k, jnp.zeros((1, 1, 4)), MaskSpec(keep_window_size=2, q_offset=q_offset),
                                          dropout_rate=dropout_rate)


def _value_and_grads(fn, args, do):
    out, vjp = jax.vjp(jax.jit(fn), *args)
    return out, vjp(do)


def _errors(args, do, mask_kw, kernel_kw):
    """Relative errors of the kernel vs the reference: {"out": …, "dq": …, "dk": …, "dv": …, "ddt": …}."""
    ref_out, ref_grads = _value_and_grads(lambda *a: dma.dynamic_mask_attention(*a, **mask_kw), args, do)
    out, grads = _value_and_grads(lambda *a: dma_pallas_tpu(*a, **mask_kw, **kernel_kw), args, do)
    assert out.shape == ref_out.shape and out.dtype == args[2].dtype
    errors = {"out": _rel(out, ref_out)}
    errors.update({name: _rel(g, r) for name, g, r in zip(("dq", "dk", "dv", "ddt"), grads, ref_grads)})
    return errors


def _check(args, do, mask_kw, kernel_kw):
    errors = _errors(args, do, mask_kw, kernel_kw)
    print({k: f"{e:.1e}" for k, e in errors.items()})
    assert errors["out"] <= OUT_RTOL, errors
    assert all(errors[name] <= GRAD_RTOL for name in ("dq", "dk", "dv", "ddt")), errors


def _segments(B, T, starts):
    marks = np.zeros((B, T), np.int32)
    for b, positions in enumerate(starts):
        marks[b, positions] = 1
    return jnp.asarray(np.cumsum(marks, axis=1))


# (shapes, mask/top-k arguments, kernel tiling). block_q counts query positions: a tile holds block_q·N/K rows,
# which must be a multiple of 128 (the smallest legal tile is used, so every case walks several tiles).
CASES = {
    "mha_h64_no_topk": (dict(B=2, T=300, S=300, N=2, K=2, G=2, H=64), dict(keep_window_size=512),
                        dict(block_q=128, block_k=128)),
    "gqa2_h128_topk": (dict(B=1, T=260, S=260, N=4, K=2, G=2, H=128), dict(keep_window_size=96),
                       dict(block_q=64, block_k=128)),
    "gqa4_bias_per_query_head_topk": (dict(B=1, T=200, S=200, N=8, K=2, G=8, H=64), dict(keep_window_size=48),
                                      dict(block_q=32, block_k=128)),
    "gqa8_topk": (dict(B=1, T=150, S=150, N=8, K=1, G=1, H=64), dict(keep_window_size=40),
                  dict(block_q=16, block_k=128)),
    "packed_segments_topk": (dict(B=2, T=200, S=200, N=4, K=2, G=2, H=64), dict(keep_window_size=24),
                             dict(block_q=64, block_k=128)),
    "sliding_window_topk": (dict(B=1, T=400, S=400, N=4, K=4, G=4, H=64),
                            dict(keep_window_size=40, sliding_window=100), dict(block_q=128, block_k=128)),
    "prefill_after_cache": (dict(B=2, T=60, S=300, N=4, K=2, G=2, H=64), dict(keep_window_size=32, q_offset=100),
                            dict(block_q=64, block_k=128)),
    "long_topk_gqa2_h128": (dict(B=1, T=512, S=512, N=4, K=2, G=2, H=128), dict(keep_window_size=128),
                            dict(block_q=64, block_k=128)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    shapes, mask_kw, kernel_kw = CASES[name]
    args, do = _inputs(list(CASES).index(name), **shapes)
    mask_kw = dict(mask_kw, scale=shapes["H"] ** -0.5)
    B, T, S = shapes["B"], shapes["T"], shapes["S"]
    if name == "packed_segments_topk":
        seg = _segments(B, T, [[37, 90], [5, 120, 121]])
        mask_kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    if name == "prefill_after_cache":  # cache slots [0, 160) filled: the 60 queries sit at positions 100..159
        mask_kw.update(kv_mask=jnp.broadcast_to(jnp.arange(S) < 160, (B, S)))
    _check(args, do, mask_kw, kernel_kw)


def test_left_padded_batch_including_rows_with_no_key():
    """Left padding: rows before a sequence's first token have no allowed key, and the reference averages all S
    values there (with the gradients of that flat softmax). Batch 1's first 150 keys are padding: its first key
    block and first query tile are skipped outright. Compared everywhere, with a cotangent on the padded rows."""
    shapes = dict(B=2, T=256, S=256, N=4, K=2, G=2, H=64)
    args, do = _inputs(11, **shapes)
    kv_mask = jnp.arange(256)[None, :] >= jnp.array([[0], [150]])
    _check(args, do, dict(scale=0.125, keep_window_size=48, kv_mask=kv_mask), dict(block_q=64, block_k=128))


def test_tied_bias_keeps_every_tied_key():
    """A = 0 at initialisation makes every dt equal: every key ties with the threshold and all are kept, as in
    the reference (torch.topk would keep an arbitrary keep_window_size of them), so the top-k changes nothing."""
    shapes = dict(B=1, T=200, S=200, N=4, K=2, G=2, H=64)
    (q, k, v, _), do = _inputs(12, **shapes)
    dt = jnp.ones((1, 2, 200), jnp.float32)
    no_topk = dma.dynamic_mask_attention(q, k, v, dt, scale=0.125, keep_window_size=200)
    assert _rel(dma.dynamic_mask_attention(q, k, v, dt, scale=0.125, keep_window_size=40), no_topk) == 0.0
    _check((q, k, v, dt), do, dict(scale=0.125, keep_window_size=40), dict(block_q=64, block_k=128))


def test_bfloat16_inputs():
    """bf16 q/k/v (the training dtype): fp32 scores, softmax and accumulation; p and dS rounded to bf16 for the
    MXU, as the reference rounds probs to v's dtype."""
    shapes = dict(B=1, T=200, S=200, N=4, K=2, G=2, H=128)
    args32, do32 = _inputs(13, **shapes)
    args16 = tuple(a.astype(jnp.bfloat16) for a in args32[:3]) + (args32[3],)
    do16 = do32.astype(jnp.bfloat16)
    kw = dict(scale=128**-0.5, keep_window_size=64)
    exact_out, exact_grads = _value_and_grads(lambda *a: dma.dynamic_mask_attention(*a, **kw), args32, do32)
    ref_out, ref_grads = _value_and_grads(lambda *a: dma.dynamic_mask_attention(*a, **kw), args16, do16)
    out, grads = _value_and_grads(lambda *a: dma_pallas_tpu(*a, **kw, block_q=64, block_k=128), args16, do16)
    assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
    kernel_err, ref_err = _rel(out, exact_out), _rel(ref_out, exact_out)
    print(f"bf16 out: kernel {kernel_err:.1e}, bf16 reference {ref_err:.1e}")
    assert kernel_err <= 2 * ref_err + 1e-2
    for name, g, r, e in zip(("dq", "dk", "dv", "ddt"), grads, ref_grads, exact_grads):
        kernel_err, ref_err = _rel(g, e), _rel(r, e)
        print(f"bf16 {name}: kernel {kernel_err:.1e}, bf16 reference {ref_err:.1e}")
        assert kernel_err <= 2 * ref_err + 2e-2, name


def test_band_tables_cover_every_allowed_pair_and_skip_the_rest():
    """The band walk's tables (read from SMEM) visit every (query tile, key block) pair holding an allowed
    (row, key), in both directions, and skip some pairs when the window, causality or the padding leave them empty."""
    B, K, T, S, bq, bk, window, offset = 2, 2, 700, 900, 64, 128, 200, 150
    kv_mask = (jnp.arange(S)[None, :] >= jnp.array([[0], [300]])) & (jnp.arange(S)[None, :] < 850)
    allowed = dma.attention_mask(B, T, S, q_offset=offset, kv_mask=kv_mask, sliding_window=window)
    s_pad = -(-S // bk) * bk
    valid = jnp.pad(kv_mask, ((0, 0), (0, s_pad - S)))
    tables, pairs = tpu_dma._band_tables(b=B, kh=K, t=T, s=S, offset=offset, block_q=bq, block_k=bk,
                                         sliding_window=window, valid=valid)
    n_q, n_kb = -(-T // bq), s_pad // bk
    padded = np.zeros((B, n_q * bq, s_pad), bool)
    padded[:, :T, :S] = np.asarray(allowed)
    needed = padded.reshape(B, n_q, bq, n_kb, bk).any(axis=(2, 4))[:, None]  # [B, 1, n_q, n_kb]

    def visited(lo, n, outer, inner):
        lo, n = np.asarray(lo).reshape(B, K, outer), np.asarray(n).reshape(B, K, outer)
        idx = np.arange(inner)
        return (idx >= lo[..., None]) & (idx < (lo + n)[..., None])

    fwd = visited(tables["run_lo"], tables["run_n"], n_q, n_kb)  # [B, K, n_q, n_kb]
    dkv = visited(tables["q_lo"], tables["q_n"], n_kb, n_q).transpose(0, 1, 3, 2)
    assert not (needed & ~fwd).any() and not (needed & ~dkv).any()
    assert fwd.sum() < fwd.size and dkv.sum() < dkv.size
    assert fwd[:, 0].sum() <= pairs["fwd_pairs"] and dkv[:, 0].sum() <= pairs["dkv_pairs"]  # the static bound


def test_unsupported_inputs_are_named():
    assert tpu_unsupported_reason(head_dim=128) is None
    assert "dropout 0.1" in tpu_unsupported_reason(dropout_rate=0.1, head_dim=128)
    assert "q_offset" in tpu_unsupported_reason(q_offset=jnp.array([3, 5]), head_dim=128)
    assert "q_offset=-1" in tpu_unsupported_reason(q_offset=-1, head_dim=128)
    assert "head_dim=512" in tpu_unsupported_reason(head_dim=512)
    assert "float16" in tpu_unsupported_reason(head_dim=64, dtype=jnp.float16)
    (q, k, v, dt), _ = _inputs(14, B=2, T=1, S=40, N=4, K=2, G=2, H=64)
    with pytest.raises(ValueError, match="q_offset"):
        jax.jit(lambda off: dma_pallas_tpu(q, k, v, dt, scale=0.125, keep_window_size=16, q_offset=off))(3)
    with pytest.raises(ValueError, match="block_q=24 must be a multiple of 64"):
        dma_pallas_tpu(q, k, v, dt, scale=0.125, keep_window_size=16, block_q=24)
    with pytest.raises(ValueError, match="dt"):
        dma_pallas_tpu(q, k, v, dt[:, :1, :3], scale=0.125, keep_window_size=16)


# --- through the model -----------------------------------------------------------------------------------------

CFG = doge_jax.DogeConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                          keep_window_size=12)


def _loss_and_grads(cfg, ids, attention_mask):
    model = model_lib.build(cfg, seed=0)
    for i, layer in enumerate(model.layers):  # A ≠ 0: dt varies across keys, so the top-k actually drops keys
        layer.self_attn.A[...] = jax.random.normal(jax.random.key(1 + i), layer.self_attn.A[...].shape)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest)(ids, attention_mask).logits
        return doge_jax.causal_lm_loss(logits, jnp.where(attention_mask == 1, ids, -100))

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_model_with_tpu_kernel_matches_xla(caplog):
    """A tiny Doge (random A, left padding, T > keep_window_size): loss and every parameter gradient, including
    A and dt_proj, with every layer's attention on the kernel vs on the reference. (One bias per query head, the
    older SmallDoge layout, is covered at the kernel level by gqa4_bias_per_query_head_topk.)"""
    ids = jnp.asarray(np.random.default_rng(0).permutation(101)[:2 * 48].reshape(2, 48), jnp.int32)  # distinct
    attention_mask = jnp.asarray(np.arange(48)[None, :] >= np.array([[0], [9]]), jnp.int32)
    loss_x, grads_x = _loss_and_grads(CFG.replace(attention_impl="xla"), ids, attention_mask)
    attention_impl._LOGGED.clear()
    with caplog.at_level("INFO", logger="absl"):
        loss_t, grads_t = _loss_and_grads(CFG.replace(attention_impl="pallas_tpu"), ids, attention_mask)
    ran = [r.getMessage() for r in caplog.records if "runs pallas_tpu" in r.getMessage()]
    assert len(ran) == CFG.num_hidden_layers, ran  # every layer ran the kernel
    errors = {jax.tree_util.keystr(path): _rel(gt, gx)
              for (path, gx), gt in zip(jax.tree.leaves_with_path(grads_x), jax.tree.leaves(grads_t))}
    print(f"model: loss {abs(float(loss_t - loss_x)) / abs(float(loss_x)):.1e}, worst gradient "
          f"{max(errors.values()):.1e} ({max(errors, key=errors.get)})")
    assert abs(float(loss_t - loss_x)) <= 1e-5 * abs(float(loss_x))
    # A's gradient sums the dt gradient over every key, and Σ_s dS[t, s] = 0 on each row: the sum nearly cancels
    # (|dA| ≈ 1e-5 here, far below its terms), so its fp32 rounding is judged at 1e-3 of its own size.
    assert all(e <= (1e-3 if "'A'" in path else GRAD_RTOL) for path, e in errors.items()), errors


# --- through the public path: convert.from_hf → load_model(attention_impl=...) --------------------------------

@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_from_hf_load_model_with_kernel_matches_transformers(tmp_path, impl):
    """A random transformers Doge (GQA 3:1, head_dim 48 — not a tile size — sliding window, T > keep_window_size,
    left padding) through the converter, loaded with a named kernel: logits equal transformers' and the xla
    model's, and nnx.grad of causal_lm_loss equals the xla model's."""
    import convert
    from hf_reference import make_hf_model, torch_logits

    hf = make_hf_model(seed=5, num_attention_heads=6, num_key_value_heads=2, head_dim=48, hidden_size=96,
                       keep_window_size=20, sliding_window=40, max_position_embeddings=128)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    ids = np.random.default_rng(3).permutation(97)[:2 * 45].reshape(2, 45).astype(np.int32)  # distinct: no ties
    mask = (np.arange(45)[None, :] >= np.array([[0], [7]])).astype(np.int32)
    want = torch_logits(hf, ids, mask)
    model_x, model_k = doge_jax.load_model(ckpt, attention_impl="xla"), doge_jax.load_model(ckpt, attention_impl=impl)
    got = np.asarray(model_k(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-5, rtol=0)
    np.testing.assert_allclose(got, np.asarray(model_x(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits),
                               atol=2e-5, rtol=0)
    labels = jnp.where(jnp.asarray(mask) == 1, jnp.asarray(ids), -100)

    def grads(model):
        loss = lambda m: doge_jax.causal_lm_loss(m(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits,
                                                 labels)  # noqa: E731
        return nnx.grad(loss)(model)

    g_x, g_k = jax.tree.leaves_with_path(nnx.to_pure_dict(grads(model_x))), jax.tree.leaves(
        nnx.to_pure_dict(grads(model_k)))
    for (path, gx), gk in zip(g_x, g_k):
        tol = (1e-3 if "'A'" in jax.tree_util.keystr(path) else GRAD_RTOL) * max(1e-6, float(jnp.max(jnp.abs(gx))))
        np.testing.assert_allclose(gk, gx, atol=tol, rtol=0, err_msg=jax.tree_util.keystr(path))
