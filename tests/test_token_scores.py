"""The chunked LM head (doge_jax/model/token_scores.py) against the full logits it replaces.

Fresh random weights (A ≠ 0) and inputs, tied and untied embeddings, targets with ignored (−100) positions,
lengths that are not multiples of the chunk. Tolerances:
- fp32: loss and z-loss rtol 1e-6; every gradient |Δ| ≤ 1e-6 · (the largest gradient entry of the model),
  since chunks sum the head's gradient in another order (measured: ≤ 3e-7).
- bf16: the chunked loss's error against an fp32 reference of the same weights is at most 1.5× the bf16 full-
  logits loss's own error (+1e-6), gradients likewise in max |Δ|.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from doge_jax.model import decoder as model_lib
from doge_jax.model.config import DogeConfig
from doge_jax.model.loss import IGNORE_INDEX, token_cross_entropy
from doge_jax.model.token_scores import (chunk_length, cross_entropy_sums, scores_from_logits, token_scores)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, V = 3, 37, 301


def _model(tied: bool, dtype: str = "float32", seed: int = 1):
    cfg = DogeConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, tie_word_embeddings=tied, max_position_embeddings=64, dtype=dtype)
    model = model_lib.build(cfg, seed=seed)
    for i, layer in enumerate(model.layers):  # A ≠ 0: dt varies over keys, as in a trained model
        layer.self_attn.A[...] = jax.random.normal(jax.random.key(100 + i), layer.self_attn.A[...].shape)
    return model


def _data(seed: int):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    ids = jax.random.randint(k1, (B, T), 0, V)
    targets = jax.random.randint(k2, (B, T), 0, V)
    targets = jnp.where(jax.random.uniform(k3, (B, T)) < 0.25, IGNORE_INDEX, targets)
    return ids, targets


def _losses(model, ids, targets, chunk_tokens):
    """(loss, z-loss, grads) of the chunked path (chunk_tokens) or, with None, of today's full logits."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params):
        m = nnx.merge(graphdef, params, rest)
        if chunk_tokens is None:
            nll, n, zsq = token_cross_entropy(m(ids).logits, targets)
        else:
            nll, n, zsq = cross_entropy_sums(token_scores(m, m(ids, head=False).hidden, targets,
                                                          chunk_tokens=chunk_tokens), targets)
        return nll / n + 1e-3 * zsq / n, (nll / n, zsq / n)

    (_, (ce, z)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return float(ce), float(z), grads


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_and_gradients_equal_the_full_logits_fp32(tied):
    model = _model(tied)
    ids, targets = _data(0 if tied else 1)
    ce, z, grads = _losses(model, ids, targets, None)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
    for chunk_tokens in (B, 4 * B, 16 * B, 0, -1):  # c = 1, 4, 16 positions, auto (one chunk here), unchunked
        ce_c, z_c, grads_c = _losses(model, ids, targets, chunk_tokens)
        assert ce_c == pytest.approx(ce, rel=1e-6) and z_c == pytest.approx(z, rel=1e-6), chunk_tokens
        for (path, g), gc in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_c)):
            np.testing.assert_allclose(gc, g, rtol=0, atol=1e-6 * scale, err_msg=f"{chunk_tokens} {path}")


def test_chunked_loss_bf16_within_the_bf16_references_own_error():
    model32 = _model(tied=True)
    model16 = _model(tied=True, dtype="bfloat16")  # the same fp32 master weights, bf16 compute
    ids, targets = _data(2)
    ce32, z32, g32 = _losses(model32, ids, targets, None)
    ce_full, _, g_full = _losses(model16, ids, targets, None)
    ce_chunk, _, g_chunk = _losses(model16, ids, targets, 4 * B)
    assert abs(ce_chunk - ce32) <= 1.5 * abs(ce_full - ce32) + 1e-6
    for a, b, c in zip(jax.tree.leaves(g32), jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
        ref_err = float(jnp.max(jnp.abs(b - a)))
        assert float(jnp.max(jnp.abs(c - a))) <= 1.5 * ref_err + 1e-6


def test_per_token_scores_equal_log_softmax_of_the_logits():
    """logp, lse and the greedy flag, token by token, as DPO / GRPO / the eval scorer read them."""
    model = _model(tied=False)
    ids, targets = _data(3)
    logits = model(ids).logits
    logp_full = jax.nn.log_softmax(logits, axis=-1)
    valid = targets != IGNORE_INDEX
    want = np.where(valid, np.take_along_axis(np.asarray(logp_full), np.where(valid, targets, 0)[..., None],
                                              -1)[..., 0], 0.0)
    got = token_scores(model, model(ids, head=False).hidden, targets, chunk_tokens=2 * B)
    np.testing.assert_allclose(got.logp, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(got.lse, np.where(valid, jax.nn.logsumexp(logits, -1), 0.0), rtol=1e-6, atol=0)
    greedy = np.asarray(valid & (jnp.argmax(logits, -1) == targets))
    np.testing.assert_array_equal(got.greedy, greedy)
    full = scores_from_logits(logits, targets)
    np.testing.assert_array_equal(full.greedy, greedy)


def test_the_target_logit_is_picked_without_a_gather_or_scatter():
    """The cut of issue 23: the target's logit is a masked sum over the vocabulary, so neither the scores nor
    their gradient hold a gather or a scatter over the [..., V] logits (on TPU the gather re-read every logit)."""
    logits = jax.random.normal(jax.random.key(7), (B, T, V))
    _, targets = _data(7)

    def f(x):
        s = scores_from_logits(x, targets)
        return jnp.sum(s.logp) + 1e-3 * jnp.sum(s.lse * s.lse)

    hlo = jax.jit(jax.grad(f)).lower(logits).as_text()
    assert "gather" not in hlo and "scatter" not in hlo
    # and the gradient is softmax − one-hot (× the z-loss term), exactly as the gather's was
    valid = targets != IGNORE_INDEX
    onehot = jax.nn.one_hot(jnp.where(valid, targets, 0), V) * valid[..., None]
    lse = jax.nn.logsumexp(logits, -1, keepdims=True)
    want = onehot - jnp.exp(logits - lse) * (valid[..., None] * (1 - 2e-3 * lse))
    np.testing.assert_allclose(jax.grad(f)(logits), want, rtol=0, atol=1e-6)


def test_chunk_length():
    assert chunk_length(8, 2048, 32768, 0) == 256  # 2^26 logits / (8 rows × 2^15 vocab) = 2^8 positions
    assert chunk_length(1, 2048, 32768, 0) == 2048  # 2^11 positions per chunk: the whole row
    assert chunk_length(64, 2048, 32768, 0) == 32
    assert chunk_length(64, 2048, 128256, 0) == 8
    assert chunk_length(4, 100, 32768, 24) == 4  # 24 tokens / 4 rows = 6 → 4 positions
    assert chunk_length(4, 100, 32768, 2) == 1  # fewer tokens than rows: one position per chunk
    assert chunk_length(4, 100, 32768, -1) == 100  # unchunked


def test_posttrain_log_probs_match_the_full_logits():
    """DPO's pair log-probs and GRPO's completion log-probs: chunked == computed from full logits."""
    from doge_jax.posttrain import dpo, grpo

    model = _model(tied=True)
    ids, targets = _data(4)
    M = 2  # pairs: rows 0-3 of [ids; ids[:1]] as [M, 2, T]
    ids4 = jnp.concatenate([ids, ids[:1]])[:2 * M].reshape(M, 2, T)
    tg4 = jnp.concatenate([targets, targets[:1]])[:2 * M].reshape(M, 2, T)
    batch = {"input_ids": ids4, "targets": tg4, "segment_ids": jnp.ones_like(ids4),
             "positions": jnp.broadcast_to(jnp.arange(T), ids4.shape)}
    chunked, counts = dpo.pair_logps(model, batch, chunk_tokens=4)
    logp = jax.nn.log_softmax(model(ids4.reshape(2 * M, T)).logits, -1)
    t = tg4.reshape(2 * M, T)
    v = t != IGNORE_INDEX
    want = jnp.sum(jnp.where(v, jnp.take_along_axis(logp, jnp.where(v, t, 0)[..., None], -1)[..., 0], 0), -1)
    np.testing.assert_allclose(chunked.reshape(-1), want, rtol=1e-6)
    np.testing.assert_array_equal(counts.reshape(-1), jnp.sum(v, -1))

    P, N = 9, 11
    prompt, tokens = ids[:, :P], ids[:, P:P + N]
    prompt_mask = jnp.ones_like(prompt).at[0, :3].set(0)  # left padding on one row
    lengths = jnp.array([N, 5, 8])
    got = grpo.completion_logps(model, prompt, prompt_mask, tokens, lengths, chunk_tokens=3)
    seq = jnp.concatenate([prompt, tokens], 1)
    mask = jnp.concatenate([prompt_mask, (jnp.arange(N)[None] < lengths[:, None]).astype(jnp.int32)], 1)
    pos = jnp.where(mask > 0, jnp.cumsum(mask, -1) - 1, 0)
    lp = jax.nn.log_softmax(model(seq, mask, positions=pos).logits[:, P - 1:P + N - 1], -1)
    np.testing.assert_allclose(got, jnp.take_along_axis(lp, tokens[..., None], -1)[..., 0], rtol=0, atol=2e-6)


MESH_CHECK = r"""
import os, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
sys.path.insert(0, sys.argv[1])
from test_token_scores import _model, _data, _losses
from doge_jax.parallel import sharding as sh
from doge_jax.trainer.mesh import make_mesh
import ml_collections
model = _model(tied=bool(int(sys.argv[2])))
ids, targets = _data(5)
ids, targets = jnp.concatenate([ids] * 4)[:8], jnp.concatenate([targets] * 4)[:8]  # 8 rows: 2 per data shard
ce, z, grads = _losses(model, ids, targets, None)
mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, expert=1)))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
params = jax.device_put(params, sh.state_shardings(params, mesh))  # vocab over tensor, embed over fsdp
model = nnx.merge(graphdef, params, rest)
ids, targets = (jax.device_put(x, sh.batch_sharding(mesh)) for x in (ids, targets))
with jax.set_mesh(mesh):
    ce_m, z_m, grads_m = _losses(model, ids, targets, 16)  # c = 2 positions per chunk
assert abs(ce_m - ce) <= 1e-6 * abs(ce) and abs(z_m - z) <= 1e-6 * abs(z), (ce_m, ce, z_m, z)
scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_m)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6 * scale)
print("ok", ce, ce_m)
"""


@pytest.mark.parametrize("tied", [1, 0])
def test_chunked_loss_under_a_mesh_equals_one_device(tied):
    """data=2 × fsdp=2 × tensor=2 on 8 CPU devices: the chunked loss (vocab over tensor, batch over data·fsdp,
    from the rules table) gives the one-device loss and gradients."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MESH_CHECK, os.path.join(REPO, "tests"), str(tied)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
