"""Doge for causal language modelling, in Flax NNX: what transformers' `DogeForCausalLM` computes.

    h = embed(ids)
    for each layer:
        h = input_residual ⊙ h + dropout(attn(norm(h)))
        h = post_attention_residual ⊙ h + dropout(mlp_or_cdmoe(norm(h)))
    logits = norm(h) @ (embedᵀ if tied else lm_head)

Parameter names mirror transformers' state dict (`layers.3.self_attn.q_proj.kernel` ↔
`model.layers.3.self_attn.q_proj.weight`ᵀ) so the converter is a mapping, not a translation table.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from doge_jax.model import attention_impl, moe_reference, rope
from doge_jax.model.attention import DogeAttention, init_cache
from doge_jax.model.config import DogeConfig
from doge_jax.model.layers import MLP, Dense, RMSNorm
from doge_jax.model.moe import CDMoE
from doge_jax.model.options import REMAT_POLICIES
from doge_jax.parallel import sharding as sh


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CausalLMOutput:
    logits: jax.Array | None  # [B, T, V] float32 (None when called with head=False)
    aux_loss: jax.Array | None = None  # MoE load balancing (unscaled), as transformers' `aux_loss`
    routing: tuple[moe_reference.Routing, ...] = ()  # per MoE layer: scores [2, B·T, nk], experts [B·T, k]
    moe: moe_reference.RoutingSummary | None = None  # aux loss, z-loss and routing statistics, computed once
    cache: list | None = None  # per layer {"k", "v", "dt"} when decoding with a cache
    hidden: jax.Array | None = None  # [B, T, D] before the final norm, when called with head=False


class DecoderLayer(nnx.Module):

    def __init__(self, cfg: DogeConfig, *, dtype, rngs: nnx.Rngs, layer_index: int | None = None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, logical_axes=(sh.EMBED,))
        self.self_attn = DogeAttention(cfg, dtype=dtype, rngs=rngs, layer_index=layer_index)
        self.input_residual = nnx.Param(jnp.ones((cfg.hidden_size,)), logical_axes=(sh.EMBED,))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, logical_axes=(sh.EMBED,))
        self.mlp = CDMoE(cfg, dtype=dtype, rngs=rngs) if cfg.is_moe else MLP(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_residual = nnx.Param(jnp.ones((cfg.hidden_size,)), logical_axes=(sh.EMBED,))
        self.dropout = nnx.Dropout(cfg.hidden_dropout, deterministic=True, rngs=rngs) if cfg.hidden_dropout > 0 else None

    def __call__(self, h, cos, sin, kv_mask, segment_ids, cache, cache_index):
        attn_out, cache = self.self_attn(self.input_layernorm(h), cos, sin, kv_mask=kv_mask,
                                         segment_ids=segment_ids, cache=cache, cache_index=cache_index)
        if self.dropout is not None:
            attn_out = self.dropout(attn_out)
        h = (self.input_residual[...] * h + attn_out).astype(h.dtype)
        block = self.mlp(self.post_attention_layernorm(h))
        mlp_out = block.out if self.dropout is None else self.dropout(block.out)
        h = (self.post_attention_residual[...] * h + mlp_out).astype(h.dtype)
        return h, cache, block.routing


class Doge(nnx.Module):
    """The causal LM. `Doge(cfg, rngs=nnx.Rngs(0))(input_ids [B, T])` → CausalLMOutput with logits [B, T, V]."""

    def __init__(self, cfg: DogeConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        std = cfg.initializer_range
        emb = std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))
        if cfg.pad_token_id is not None and 0 <= cfg.pad_token_id < cfg.vocab_size:
            emb = emb.at[cfg.pad_token_id].set(0.0)  # nn.Embedding(padding_idx) zeroes that row, as transformers
        self.embed_tokens = nnx.Param(emb, logical_axes=(sh.VOCAB, sh.EMBED))
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs, layer_index=i)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, logical_axes=(sh.EMBED,))
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, logical_axes=(sh.EMBED, sh.VOCAB), init_std=std,
            dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: list | None = None,
        cache_index: jax.Array | int | None = None,
        logits_at: jax.Array | None = None,
        head: bool = True,
    ) -> CausalLMOutput:
        """input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = padding), or with a cache [B, S_cache]
        marking the filled slots; positions [B, T] (default 0..T-1, or cache_index.. with a cache);
        segment_ids [B, T] for packed sequences (attention never crosses segments); logits_at [B, W] int: the
        positions whose logits are wanted (logits [B, W, V]: the final norm and LM head run on W positions, not
        T, as scoring a few continuation tokens needs; transformers' `logits_to_keep` with an index per row);
        head=False: no final norm or LM head, `hidden` [B, T, D] instead of logits, for
        `doge_jax.model.token_scores`, which runs them chunk by chunk without holding [B, T, V]."""
        cfg = self.cfg
        B, T = input_ids.shape
        if positions is None:
            start = 0 if cache is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rope.rope_tables(cfg, positions)
        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)  # [B, T, D]

        layer_call = lambda layer, *args: layer(*args)  # noqa: E731
        remat = attention_impl.resolved_remat(cfg.remat_policy, cfg.attention_impl)
        if remat not in ("none", "scores"):  # layer remat; REMAT_POLICIES["full"] is None: save nothing
            layer_call = nnx.remat(layer_call, policy=REMAT_POLICIES[remat])
        new_cache, routings = [], []
        # The residual stream at every layer boundary: batch over the data axes, T and D whole (the identity
        # without a mesh). Propagation alone picks layouts that keep far larger activations per device:
        # Doge-20M on data=8 x fsdp=8 needs 21.1 GB per device without this, 6.2 GB with it; on
        # fsdp=16 x tensor=4, 44.2 vs 9.8 GB (benchmarks/memory_table.py --compare-constraints, README).
        residual = (sh.BATCH, sh.LENGTH, None)
        h = sh.constrain(h, residual)
        for i, layer in enumerate(self.layers):
            h, layer_cache, routing = layer_call(layer, h, cos, sin, attention_mask, segment_ids,
                                                 None if cache is None else cache[i], cache_index)
            h = sh.constrain(h, residual)
            new_cache.append(layer_cache)
            if routing is not None:
                routings.append(routing)
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[..., None].astype(jnp.int32), axis=1)  # [B, W, D]
        logits = self.logits(h) if head else None

        summary = None
        if routings:
            token_mask = None
            if cache is None and attention_mask is not None:
                token_mask = attention_mask.reshape(-1)
            elif segment_ids is not None:
                token_mask = (segment_ids > 0).reshape(-1)
            summary = moe_reference.routing_summary(routings, cfg.num_experts, token_mask)
        return CausalLMOutput(logits=logits, aux_loss=None if summary is None else summary.aux_loss,
                              routing=tuple(routings), moe=summary, cache=None if cache is None else new_cache,
                              hidden=None if head else h)

    def logits(self, h: jax.Array) -> jax.Array:
        """The final norm and the LM head (the embedding's transpose when tied): h [..., D] → float32 [..., V].

        The product accumulates and is written in float32 (in a bf16 model too): a separate cast of bf16 logits
        was a full extra pass over the largest tensor of a small model's step (7 % of a Doge-20M step on an
        H200), and the bf16 rounding of the logits it undid was only error."""
        h = self.norm(h)
        weight = self.embed_tokens[...].T if self.lm_head is None else self.lm_head.kernel[...]  # [D, V]
        return jnp.dot(h.astype(self.dtype), weight.astype(self.dtype), preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, max_len: int) -> list:
        return [init_cache(self.cfg, batch, max_len, self.dtype) for _ in range(self.cfg.num_hidden_layers)]


def build(cfg: DogeConfig, seed: int = 0) -> Doge:
    return Doge(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def abstract_model(cfg: DogeConfig) -> Doge:
    """The model with ShapeDtypeStructs instead of arrays: shapes and counts without allocating."""
    return nnx.eval_shape(lambda: build(cfg))


def count_params(model_or_cfg) -> int:
    model = abstract_model(model_or_cfg) if isinstance(model_or_cfg, DogeConfig) else model_or_cfg
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
