"""The DMA reference over chunks of queries, each recomputed in the backward pass: the XLA path's memory.

    out = dma_reference_chunked(q, k, v, dt, mask, scale=scale)      # == dma_reference(...), less memory

`dma_reference` holds [B, N, T, S] scores, bias and probabilities, and a backward pass keeps them for every
layer: on a CPU (no kernel) they were most of a training step's memory (Doge-20M at 8 × 2048: ~0.8 GB per layer).
Here a `lax.scan` runs the reference on c query rows at a time under `jax.checkpoint`, so the forward keeps only
q, k, v and dt, and the backward recomputes one chunk's [B, N, c, S] tensors inside the same loop iteration that
consumes them. A plain `jax.checkpoint` around the whole reference is not enough: the compiler may schedule every
layer's recompute early (XLA:CPU did), and they are all alive at once again; inside the scan's backward loop the
recompute of a chunk cannot run before that chunk's cotangent exists.

Per-row semantics are the reference's: the causal/segment mask and the top-k (keep_window_size largest dt among
a row's allowed keys) are computed row by row, so cutting the rows into chunks changes nothing but rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from doge_jax.model.dma_reference import dma_reference
from doge_jax.model.mask import MaskSpec

CHUNK_ELEMENTS = 2**24  # [B, N, c, S] elements per chunk: 64 MiB of float32 per tensor


def query_chunk(batch: int, heads: int, q_len: int, kv_len: int) -> int:
    """Query rows per chunk: a power of two ≥ 16 with about CHUNK_ELEMENTS scores, or q_len when that is fewer."""
    c = max(CHUNK_ELEMENTS // max(batch * heads * kv_len, 1), 16)
    c = 1 << (c.bit_length() - 1)
    return q_len if c >= q_len else c


def dma_reference_chunked(q: jax.Array, k: jax.Array, v: jax.Array, dt: jax.Array, mask: MaskSpec, *,
                          scale: float, dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                          chunk: int | None = None) -> jax.Array:
    """`dma_reference` (q [B, T, N, H], k/v [B, S, K, H], dt [B, G, S] → [B, T, N, H]) over chunks of `chunk` query
    rows (default `query_chunk`), each recomputed in the backward pass. A traced / per-row q_offset (decoding)
    takes one checkpointed chunk."""
    B, T, N, H = q.shape
    S = k.shape[1]
    c = chunk or query_chunk(B, N, T, S)
    offset = mask.static_offset

    def one(q_c, seg_c, start, rng):
        m = mask.replace(q_offset=offset + start, q_segment_ids=seg_c) if seg_c is not None else \
            mask.replace(q_offset=offset + start)
        return dma_reference(q_c, k, v, dt, m, scale=scale, dropout_rate=dropout_rate, dropout_rng=rng)

    if offset is None or c >= T:
        return jax.checkpoint(lambda q_: dma_reference(q_, k, v, dt, mask, scale=scale, dropout_rate=dropout_rate,
                                                       dropout_rng=dropout_rng))(q)
    n = -(-T // c)
    pad = n * c - T
    q_p = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, c, N, H).transpose(1, 0, 2, 3, 4)
    seg = mask.q_segment_ids
    if seg is not None:  # padded rows: a segment no key has (their output is discarded)
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1).reshape(B, n, c).transpose(1, 0, 2)
    rngs = (jax.random.split(dropout_rng, n) if dropout_rng is not None else None)

    @jax.checkpoint
    def body(carry, xs):
        q_c, seg_c, i, rng = xs
        return carry, one(q_c, seg_c, i * c, rng)

    _, out = jax.lax.scan(body, None, (q_p, seg, jnp.arange(n), rngs))  # [n, B, c, N, H]
    return out.transpose(1, 0, 2, 3, 4).reshape(B, n * c, N, H)[:, :T]
