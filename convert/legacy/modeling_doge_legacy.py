"""The first published SmallDoge layout (Doge-60M/160M/320M and their -Instruct models) on transformers 5's Doge.

Shipped as remote code inside every folder `python -m convert to-hf` writes for that layout, registered through
`auto_map` (`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`); it imports only torch and
transformers. Everything is transformers' native `transformers.models.doge.modeling_doge` except the two things
that layout does differently, both in the attention:

- no q/k RMSNorm: queries and keys go to RoPE straight from their projections;
- one dynamic-mask bias per *attention* head: `A` [N] and `dt_proj` [K·H → N] (native Doge: one per kv head),
  so the bias is not repeated over the query heads of a kv group.

Weight names are transformers' (`model.embed_tokens`, `model.layers.i.input_residual`, `...mlp.gate_proj`, ...),
which SmallDoge's Hub repos also use since August 2025. Sequences up to `keep_window_size` (2048 in every
published config) compute exactly what SmallDoge's original code computed; past it, this file keeps the
`keep_window_size` largest biases per query as transformers' Doge does, where the original code kept all keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.doge import modeling_doge as doge

from .configuration_doge_legacy import DogeLegacyConfig


class DogeLegacyAttention(doge.DogeAttention):
    def __init__(self, config: DogeLegacyConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        heads, kv_width = config.num_attention_heads, config.num_key_value_heads * self.head_dim
        self.A = nn.Parameter(torch.zeros(heads))
        self.dt_proj = nn.Linear(kv_width, heads, bias=config.attention_bias)
        del self.q_norm, self.k_norm

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, N, T, H]
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, K, T, H]
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, K, T, H]

        cos, sin = position_embeddings
        query_states, key_states = doge.apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        # The bias comes from the (cached) values: dt [B, N, S], one row per attention head.
        dt_states = self.dt_proj(
            value_states.transpose(1, 2).reshape(value_states.shape[0], value_states.shape[-2], -1)
        )
        dt_states = torch.exp(self.A * F.softplus(dt_states)).transpose(-1, -2)
        attn_mask = self.prepare_dynamic_mask(  # [B, N, T, S]: already per query head, no repeat_kv
            hidden_states=hidden_states,
            dt_states=dt_states,
            keep_window_size=self.keep_window_size,
            attention_mask=attention_mask,
        )

        attention_interface: Callable = doge.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, doge.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask=attn_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class DogeLegacyDecoderLayer(doge.DogeDecoderLayer):
    def __init__(self, config: DogeLegacyConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        self.self_attn = DogeLegacyAttention(config=config, layer_idx=layer_idx)


class DogeLegacyPreTrainedModel(doge.DogePreTrainedModel):
    config_class = DogeLegacyConfig
    config: DogeLegacyConfig


class DogeLegacyModel(DogeLegacyPreTrainedModel, doge.DogeModel):
    def __init__(self, config: DogeLegacyConfig):
        # DogeModel.__init__ would build native layers; this builds the same modules with the legacy layer.
        DogeLegacyPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DogeLegacyDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = doge.DogeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = doge.DogeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DogeLegacyForCausalLM(DogeLegacyPreTrainedModel, doge.DogeForCausalLM):
    def __init__(self, config: DogeLegacyConfig):
        DogeLegacyPreTrainedModel.__init__(self, config)
        self.model = DogeLegacyModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


__all__ = ["DogeLegacyForCausalLM", "DogeLegacyModel", "DogeLegacyPreTrainedModel"]
