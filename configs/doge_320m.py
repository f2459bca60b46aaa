"""Doge-320M: 335M parameters. Published shape: 32 layers, hidden 1024, ff 2048, 8 heads / 4 kv heads."""

from configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.num_hidden_layers = 32
    m.hidden_size = 1024
    m.intermediate_size = 2048
    m.num_attention_heads = 8
    m.num_key_value_heads = 4
    return config
