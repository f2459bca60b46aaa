"""Doge-40M-MoE: the 20M-style trunk (hidden 256, 8 layers, 2/1 heads) with ff 768 and a CDMoE of 1024 rank-1
experts (32² product keys), top-8, on the 128256-token vocabulary."""

from doge_jax.configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.vocab_size = 128256
    m.num_hidden_layers = 8
    m.hidden_size = 256
    m.intermediate_size = 768
    m.num_attention_heads = 2
    base.doge_architecture(m, num_key_value_heads=1)  # tied embeddings, dynamic NTK RoPE ×4, GQA
    m.is_moe = True
    m.num_experts = 1024
    m.num_experts_per_tok = 8
    return config
