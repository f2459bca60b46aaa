"""Doge-160M: 152M parameters. Published shape: 24 layers, hidden 768, ff 1536, 6 heads / 3 kv heads."""

from configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.num_hidden_layers = 24
    m.hidden_size = 768
    m.intermediate_size = 1536
    m.num_attention_heads = 6
    m.num_key_value_heads = 3
    return config
