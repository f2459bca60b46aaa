"""The Dynamic Mask Attention layer: projections, q/k norm, RoPE, the dt bias, and an optional KV cache.

The attention arithmetic itself is chosen by `attention_impl.attention` (the reference or a Pallas kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from doge_jax.model import attention_impl, rope
from doge_jax.model.layers import Dense, RMSNorm
from doge_jax.model.mask import MaskSpec
from doge_jax.parallel import sharding as sh


class DogeAttention(nnx.Module):

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs, layer_index: int | None = None):
        self.cfg = cfg
        self.layer_index = layer_index  # named in the log line that says which attention implementation runs
        D, N, K, H, G = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.num_dt_heads)
        dense = functools.partial(Dense, use_bias=cfg.attention_bias, init_std=cfg.initializer_range,
                                  dtype=dtype, rngs=rngs)
        self.q_proj = dense(D, N * H, logical_axes=(sh.EMBED, sh.HEADS))
        self.k_proj = dense(D, K * H, logical_axes=(sh.EMBED, sh.KV_HEADS))
        self.v_proj = dense(D, K * H, logical_axes=(sh.EMBED, sh.KV_HEADS))
        # dt = exp(A · softplus(dt_proj(v))): one bias per key and bias head. A starts at zero, as in transformers.
        self.A = nnx.Param(jnp.zeros((G,)), logical_axes=(sh.DT_HEADS,))
        self.dt_proj = dense(K * H, G, logical_axes=(sh.KV_HEADS, sh.DT_HEADS))
        self.o_proj = dense(N * H, D, logical_axes=(sh.HEADS, sh.EMBED))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, eps=cfg.rms_norm_eps, logical_axes=(sh.HEAD_DIM,))
            self.k_norm = RMSNorm(H, eps=cfg.rms_norm_eps, logical_axes=(sh.HEAD_DIM,))
        else:
            self.q_norm = self.k_norm = None
        self.rngs = rngs if cfg.attention_dropout > 0 else None
        self.deterministic = True  # flipped by model.train() / model.eval()

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, *, kv_mask=None, segment_ids=None,
                 cache: dict | None = None, cache_index=None):
        """x [B, T, D]; cos/sin [B, T, H]; kv_mask [B, S] (S = T, or the cache length when decoding).

        With `cache` ({"k", "v": [B, S, K, H], "dt": [B, G, S]}) the new keys are written at `cache_index` and the
        queries attend to the whole cache; returns (out [B, T, D], updated cache or None).
        """
        cfg = self.cfg
        B, T, _ = x.shape
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self.q_proj(x).reshape(B, T, N, H)  # [B, T, N, H]
        k = self.k_proj(x).reshape(B, T, K, H)  # [B, T, K, H]
        v = self.v_proj(x).reshape(B, T, K, H)  # [B, T, K, H]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        dt = self.dt_proj(v.reshape(B, T, K * H)).astype(jnp.float32)  # [B, T, G]
        dt = jnp.exp(self.A[...] * jax.nn.softplus(dt)).transpose(0, 2, 1)  # [B, G, T]

        q_offset = 0
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
            dt = jax.lax.dynamic_update_slice(cache["dt"], dt, (0, 0, cache_index))
            cache = {"k": k, "v": v, "dt": dt}
            q_offset = cache_index

        dropout = 0.0 if self.deterministic else cfg.attention_dropout
        mask = MaskSpec(keep_window_size=cfg.keep_window_size, q_offset=q_offset, kv_mask=kv_mask,
                        q_segment_ids=segment_ids, kv_segment_ids=segment_ids, sliding_window=cfg.sliding_window)
        out = attention_impl.attention(
            q, k, v, dt, mask, scale=H**-0.5, impl=cfg.attention_impl, dropout_rate=dropout,
            dropout_rng=self.rngs.dropout() if dropout > 0 else None, layer=self.layer_index,
            recompute_scores=attention_impl.resolved_remat(cfg.remat_policy, cfg.attention_impl) == "scores")
        return self.o_proj(out.reshape(B, T, N * H)), cache


def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache for one layer: k/v [B, S, K, H], dt [B, G, S] (dt stays float32)."""
    kv = jnp.zeros((batch, max_len, cfg.num_key_value_heads, cfg.head_dim), dtype)
    return {"k": kv, "v": kv, "dt": jnp.zeros((batch, cfg.num_dt_heads, max_len), jnp.float32)}
