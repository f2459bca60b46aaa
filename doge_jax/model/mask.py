"""Which keys each query may see: the mask arguments of Dynamic Mask Attention, written once.

Every implementation of DMA (the reference in `dma_reference`, the kernels in `doge_jax.kernels`) takes one
`MaskSpec` instead of repeating its six arguments, and `MaskSpec.allowed` is the one definition of what they mean:

    allowed[b, t, s] = causal (s ≤ q_offset + t) & sliding window & same segment & key not padding

Einsum legend (used across doge_jax): B batch, T query length, S key length, N query heads, K kv heads,
R query heads per kv head (N = K·R), G bias heads (K, or N for the older SmallDoge layout), H head dim,
D model dim, F ff dim, E experts, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The mask and top-k window of one attention call.

    keep_window_size: each query row keeps its `keep_window_size` largest `dt` among the allowed keys.
    q_offset: query t sits at key index `q_offset + t` (an int, or a traced scalar / [B] array when decoding).
    kv_mask [B, S]: False for padding / empty cache slots. q_segment_ids [B, T] / kv_segment_ids [B, S]: packed
    documents (attention never crosses a segment). sliding_window: keys more than this far back are masked.
    """

    keep_window_size: int
    q_offset: Any = 0
    kv_mask: jax.Array | None = None
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError("MaskSpec: pass both q_segment_ids and kv_segment_ids, or neither")

    def replace(self, **changes) -> "MaskSpec":
        return dataclasses.replace(self, **changes)

    @property
    def static_offset(self) -> int | None:
        """q_offset as a Python int, or None when it is traced or per batch (decoding with a cache)."""
        q_offset = self.q_offset
        if isinstance(q_offset, (int, np.integer)):
            return int(q_offset)
        if isinstance(q_offset, jax.core.Tracer):
            return None
        arr = np.asarray(q_offset)
        return int(arr) if arr.ndim == 0 else None

    def allowed(self, batch: int, q_len: int, kv_len: int) -> jax.Array:
        """bool [B, T, S]: which keys each query may see."""
        q_idx = jnp.arange(q_len)[None, :] + jnp.reshape(jnp.asarray(self.q_offset), (-1, 1))  # [B or 1, T]
        kv_idx = jnp.arange(kv_len)
        allowed = kv_idx[None, None, :] <= q_idx[:, :, None]  # [B or 1, T, S]
        if self.sliding_window is not None:
            allowed &= kv_idx[None, None, :] > q_idx[:, :, None] - self.sliding_window
        allowed = jnp.broadcast_to(allowed, (batch, q_len, kv_len))
        if self.kv_mask is not None:
            allowed &= self.kv_mask[:, None, :].astype(bool)
        if self.q_segment_ids is not None:
            allowed &= self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
        return allowed


def masked_bias(dt: jax.Array, allowed: jax.Array, keep_window_size: int) -> jax.Array:
    """The additive mask of DMA. dt [B, G, S] (fp32), allowed [B, T, S] → [B, G, T, S] fp32.

    Keys outside `allowed`, and allowed keys below the row's keep_window_size-th largest dt, get MASK_VALUE.
    Ties at the threshold are all kept (see `dma_reference`'s module docstring).
    """
    m = jnp.where(allowed[:, None, :, :], dt[:, :, None, :].astype(jnp.float32), MASK_VALUE)
    if m.shape[-1] > keep_window_size:
        thr = jax.lax.top_k(m, keep_window_size)[0][..., -1:]
        m = jnp.where(m >= jax.lax.stop_gradient(thr), m, MASK_VALUE)
    return m
