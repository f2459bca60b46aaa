"""Dynamic Mask Attention: the plain-jnp reference every implementation is tested against.

Einsum legend: see `doge_jax.model.mask`.

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

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from doge_jax.model.mask import MaskSpec, masked_bias
from doge_jax.model.options import ATTENTION_OUT


def dma_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dt: jax.Array,
    mask: MaskSpec,
    *,
    scale: float,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Reference DMA. q [B, T, N, H], k/v [B, S, K, H], dt [B, G, S] → [B, T, N, H].

    Scores, bias and softmax in fp32; the value product in v's dtype (as transformers casts probs to it).
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    R = N // K
    G = dt.shape[1]
    allowed = mask.allowed(B, T, k.shape[1])  # [B, T, S]
    qg = q.reshape(B, T, K, R, H)  # [B, T, K, R, H]
    scores = jnp.einsum("BTKRH,BSKH->BKRTS", qg, k, preferred_element_type=jnp.float32) * scale
    m = masked_bias(dt, allowed, mask.keep_window_size)  # [B, G, T, S]
    m = m.reshape(B, K, G // K, T, -1)  # [B, K, 1 or R, T, S]: head n = k·R + r uses bias head n (G = N) or k
    probs = jax.nn.softmax(scores + m, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("BKRTS,BSKH->BTKRH", probs.astype(v.dtype), v)
    return checkpoint_name(out.reshape(B, T, N, H), ATTENTION_OUT)
