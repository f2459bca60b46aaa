"""A model with attention_impl="pallas_gpu" (interpret mode on CPU) gives the loss and gradients of attention_impl="xla"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import doge_jax
from doge_jax.model import decoder as model_lib

CFG = doge_jax.DogeConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          keep_window_size=6)


def _loss_and_grads(cfg, ids, attention_mask):
    model = model_lib.build(cfg, seed=0)
    for layer in model.layers:  # A ≠ 0: dt varies across keys, so the top-k actually drops keys
        layer.self_attn.A[...] = jax.random.normal(jax.random.key(1), layer.self_attn.A[...].shape)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest)(ids, attention_mask).logits
        return doge_jax.causal_lm_loss(logits, jnp.where(attention_mask == 1, ids, -100))

    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("dt_heads", ["kv", "attention"])
def test_pallas_model_matches_xla(dt_heads):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 101, size=(2, 40)), jnp.int32)
    attention_mask = jnp.asarray(np.arange(40)[None, :] >= np.array([[0], [9]]), jnp.int32)  # left padding
    loss_x, grads_x = _loss_and_grads(CFG.replace(dt_heads=dt_heads), ids, attention_mask)
    loss_p, grads_p = _loss_and_grads(CFG.replace(dt_heads=dt_heads, attention_impl="pallas_gpu"), ids, attention_mask)
    np.testing.assert_allclose(loss_p, loss_x, atol=1e-5, rtol=0)
    flat_x, flat_p = jax.tree.leaves_with_path(grads_x), jax.tree.leaves(grads_p)
    for (path, gx), gp in zip(flat_x, flat_p):
        tol = 1e-4 * max(1.0, float(jnp.max(jnp.abs(gx))))
        np.testing.assert_allclose(gp, gx, atol=tol, rtol=0, err_msg=jax.tree_util.keystr(path))
