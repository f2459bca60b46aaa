"""Next-token cross-entropy, as transformers' `ForCausalLMLoss` computes it (ignore index −100)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [..., V], targets [...] already aligned (IGNORE_INDEX = no loss).

    Returns (sum of losses, number of counted tokens, sum of logsumexp² over counted tokens for z-loss)."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, lse - picked, 0.0)
    return jnp.sum(nll), jnp.sum(valid), jnp.sum(jnp.where(valid, lse * lse, 0.0))


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean loss over counted tokens; targets[t] is the token after position t."""
    total, count, _ = token_cross_entropy(logits, targets)
    return total / jnp.maximum(count, 1)


def shift_labels(labels: jax.Array) -> jax.Array:
    """transformers' convention: labels[t] is token t; the loss at t predicts labels[t + 1]."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """transformers' `DogeForCausalLM(..., labels=labels).loss` without the MoE aux term."""
    return next_token_loss(logits, shift_labels(labels))
