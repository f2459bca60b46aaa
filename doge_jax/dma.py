"""Dynamic Mask Attention: the plain-jnp reference, and the one entry point every caller uses.

Einsum legend (used across doge_jax): B batch, T query length, S key length, N query heads, K kv heads,
R query heads per kv head (N = K·R), G bias heads (K, or N for the older SmallDoge layout), H head dim,
D model dim, F ff dim, E experts, V vocab.

What transformers' `DogeAttention` computes, written once:

    bias[b, g, s]   = dt[b, g, s]                       (dt = exp(A · softplus(dt_proj(v))) ≥ 0)
    allowed[b, t, s] = causal & sliding window & same segment & key not padding
    m[b, g, t, s]   = bias if allowed else finfo(float32).min
    if S > keep_window_size: m = m where m is among the keep_window_size largest of its row, else min
    probs = softmax(q·kᵀ · scale + m)

The bias is *added* to the scores (it is not a log-mask). Rows with no allowed key (a left-padding query) get
a uniform distribution, as in transformers, because every score is the same `min`.

Ties in the top-k: transformers uses `torch.topk`, which breaks ties arbitrarily. We keep every key whose value
is ≥ the row's `keep_window_size`-th largest, so tied keys at the threshold are all kept (a deterministic
superset). With continuous `dt` (any trained model: `A` ≠ 0) there are no ties and the two agree exactly; at
initialisation `A = 0` makes every `dt` equal to 1 and both variants are valid "top-k" choices.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def attention_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    q_offset: jax.Array | int = 0,
    kv_mask: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Which keys each query may see. Returns bool [B, T, S].

    Query t sits at key index `q_offset + t` (q_offset: scalar or [B], non-zero when decoding with a cache).
    kv_mask [B, S]: False for padding / empty cache slots. Segment ids [B, T] / [B, S]: packed documents.
    """
    q_idx = jnp.arange(q_len)[None, :] + jnp.reshape(jnp.asarray(q_offset), (-1, 1))  # [B or 1, T]
    kv_idx = jnp.arange(kv_len)
    allowed = kv_idx[None, None, :] <= q_idx[:, :, None]  # [B or 1, T, S]
    if sliding_window is not None:
        allowed &= kv_idx[None, None, :] > q_idx[:, :, None] - sliding_window
    allowed = jnp.broadcast_to(allowed, (batch, q_len, kv_len))
    if kv_mask is not None:
        allowed &= kv_mask[:, None, :].astype(bool)
    if q_segment_ids is not None:
        allowed &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return allowed


def masked_bias(dt: jax.Array, allowed: jax.Array, keep_window_size: int) -> jax.Array:
    """The additive mask of DMA. dt [B, G, S] (fp32), allowed [B, T, S] → [B, G, T, S] fp32."""
    m = jnp.where(allowed[:, None, :, :], dt[:, :, None, :].astype(jnp.float32), MASK_VALUE)
    if m.shape[-1] > keep_window_size:
        # The row's keep_window_size-th largest value; keys at or above it stay (see module docstring on ties).
        thr = jax.lax.top_k(m, keep_window_size)[0][..., -1:]
        m = jnp.where(m >= jax.lax.stop_gradient(thr), m, MASK_VALUE)
    return m


def dma_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dt: jax.Array,
    allowed: jax.Array,
    *,
    scale: float,
    keep_window_size: int,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Reference DMA. q [B, T, N, H], k/v [B, S, K, H], dt [B, G, S], allowed [B, T, S] → [B, T, N, H].

    Scores, bias and softmax in fp32; the value product in v's dtype (as transformers casts probs to it).
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    R = N // K
    G = dt.shape[1]
    qg = q.reshape(B, T, K, R, H)  # [B, T, K, R, H]
    scores = jnp.einsum("BTKRH,BSKH->BKRTS", qg, k, preferred_element_type=jnp.float32) * scale
    m = masked_bias(dt, allowed, keep_window_size)  # [B, G, T, S]
    m = m.reshape(B, K, G // K, T, -1)  # [B, K, 1 or R, T, S]: head n = k·R + r uses bias head n (G = N) or k
    probs = jax.nn.softmax(scores + m, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("BKRTS,BSKH->BTKRH", probs.astype(v.dtype), v)
    return out.reshape(B, T, N, H)


def dynamic_mask_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dt: jax.Array,
    *,
    scale: float,
    keep_window_size: int,
    q_offset: jax.Array | int = 0,
    kv_mask: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    impl: Literal["xla", "pallas", "auto"] = "xla",
) -> jax.Array:
    """The one attention function of the model. Shapes as in `dma_reference`; masks as in `attention_mask`.

    impl="xla" is the reference above; "pallas" is the fused kernel (doge_jax.kernels); "auto" picks the kernel
    on GPU/TPU and the reference on CPU.
    """
    if impl == "auto":
        impl = "xla" if jax.default_backend() == "cpu" else "pallas"
    if impl == "pallas":
        from doge_jax.kernels import dma_pallas  # Imported lazily: the reference path needs no Pallas.

        return dma_pallas(
            q, k, v, dt, scale=scale, keep_window_size=keep_window_size, q_offset=q_offset, kv_mask=kv_mask,
            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
            dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    allowed = attention_mask(
        q.shape[0], q.shape[1], k.shape[1], q_offset=q_offset, kv_mask=kv_mask, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, sliding_window=sliding_window)
    return dma_reference(q, k, v, dt, allowed, scale=scale, keep_window_size=keep_window_size,
                         dropout_rate=dropout_rate, dropout_rng=dropout_rng)
