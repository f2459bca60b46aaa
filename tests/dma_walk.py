"""How many keys the GPU kernel's sparse walk reads per query tile: a cost count for tests and benchmarks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def walked_keys(ntab: jax.Array, *, n_keys: int, q_offset: int, block_q: int, block_k: int, chunk: int) -> jax.Array:
    """Keys the sparse walk reads per query tile: ntab [..., n_q_tiles, n_chunks] → [..., n_q_tiles] (FLOP count)."""
    n_q_tiles, n_chunks = ntab.shape[-2:]
    p_first = q_offset + jnp.arange(n_q_tiles) * block_q
    c_first = jnp.minimum(p_first // chunk, n_chunks)
    c_last = jnp.minimum((p_first + block_q - 1) // chunk, n_chunks - 1)
    c = jnp.arange(n_chunks)
    size = jnp.minimum(chunk, n_keys - c * chunk)
    head = -(-ntab // block_k) * block_k
    before = c[None, :] < c_first[:, None]
    overlap = (c[None, :] >= c_first[:, None]) & (c[None, :] <= c_last[:, None])
    return jnp.sum(jnp.where(before, head, 0) + jnp.where(overlap, size, 0), axis=-1)
