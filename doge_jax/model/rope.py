"""Rotary position embeddings as transformers computes them: default, linear and dynamic-NTK scaling.

Dynamic NTK (the Doge presets: factor 4 over max_position_embeddings) rescales the base from the longest
position in the call, `L = max(positions) + 1`: base' = base · (factor·L/max_pos − (factor − 1))^(dim/(dim−2))
when L > max_pos, else the unscaled frequencies. transformers does the same from `max(position_ids) + 1`; it also
caches the largest L seen by a module across calls, which only matters when one torch module object serves
several long calls in a row (doge-jax is stateless: each call uses its own L).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inv_frequencies(cfg, max_position: jax.Array | int | None = None) -> jax.Array:
    """[H/2] float32 inverse frequencies. `max_position` = max(positions) + 1 (used by dynamic scaling)."""
    dim = cfg.head_dim
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    base = jnp.float32(cfg.rope_theta)
    if cfg.rope_type == "dynamic" and max_position is not None:
        seq_len = jnp.maximum(jnp.asarray(max_position, jnp.float32), cfg.max_position_embeddings)
        factor = cfg.rope_factor
        base = base * ((factor * seq_len / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    return inv_freq


def rope_tables(cfg, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] float32 for int positions [B, T] (halves duplicated, as `rotate_half` expects)."""
    inv_freq = inv_frequencies(cfg, jnp.max(positions) + 1)
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H] rotated by cos/sin [B, T, H]; computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
