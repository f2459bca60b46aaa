"""Invariances of the model itself: cached decoding == full forward, packing == separate sequences, dropout."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import doge_jax
from doge_jax.model import decoder as model_lib

CFG = doge_jax.DogeConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          keep_window_size=6, rope_type="dynamic", rope_factor=2.0)


def _model(**overrides):
    m = model_lib.build(CFG.replace(**overrides), seed=0)
    for layer in m.layers:  # A ≠ 0: a continuous dt, so the top-k has no ties
        layer.self_attn.A[...] = jax.random.normal(jax.random.key(1), layer.self_attn.A[...].shape)
    return m


@pytest.mark.parametrize("overrides", [dict(), dict(is_moe=True, num_experts=36, num_experts_per_tok=4)],
                         ids=["dense", "moe"])
def test_cached_decoding_equals_full_forward(overrides):
    model = _model(**overrides)
    ids = jnp.asarray(np.random.default_rng(0).permutation(101)[:20].reshape(1, 20), jnp.int32)
    full = model(ids).logits
    cache = model.init_cache(1, 20)
    valid = jnp.zeros((1, 20), jnp.int32)
    out = model(ids[:, :8], valid.at[:, :8].set(1), cache=cache, cache_index=0)
    steps = [out.logits]
    cache = out.cache
    for t in range(8, 20):
        out = model(ids[:, t:t + 1], valid.at[:, :t + 1].set(1), cache=cache, cache_index=t)
        cache = out.cache
        steps.append(out.logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=0)


def test_packed_segments_equal_separate_sequences():
    model = _model()
    rng = np.random.default_rng(1)
    a, b = rng.permutation(101)[:7], rng.permutation(101)[:9]
    packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
    segments = jnp.asarray([[1] * 7 + [2] * 9])
    positions = jnp.asarray([list(range(7)) + list(range(9))])
    out = model(packed, segment_ids=segments, positions=positions).logits
    np.testing.assert_allclose(out[:, :7], model(jnp.asarray(a[None], jnp.int32)).logits, atol=2e-5, rtol=0)
    np.testing.assert_allclose(out[:, 7:], model(jnp.asarray(b[None], jnp.int32)).logits, atol=2e-5, rtol=0)


def test_dropout_only_in_training_mode():
    model = _model(hidden_dropout=0.2, attention_dropout=0.2)
    ids = jnp.asarray(np.arange(12)[None] % 101, jnp.int32)
    ref = model(ids).logits
    np.testing.assert_array_equal(model(ids).logits, ref)
    model.train()
    a, b = model(ids).logits, model(ids).logits
    assert not np.allclose(a, b) and not np.allclose(a, ref)
    model.eval()
    np.testing.assert_array_equal(model(ids).logits, ref)


def test_remat_and_bfloat16_run():
    ids = jnp.asarray(np.arange(12)[None] % 101, jnp.int32)
    ref = _model()(ids).logits
    np.testing.assert_allclose(_model(remat_policy="full")(ids).logits, ref, atol=1e-6)
    bf16 = _model(dtype="bfloat16")(ids).logits
    assert bf16.dtype == jnp.float32 and np.abs(bf16 - ref).max() < 0.05
