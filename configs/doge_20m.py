"""Doge-20M: 13.1M parameters with the 32768 vocab (tied). Published shape: 8 layers, hidden 256, ff 512, 2 heads / 1 kv heads."""

from configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.num_hidden_layers = 8
    m.hidden_size = 256
    m.intermediate_size = 512
    m.num_attention_heads = 2
    m.num_key_value_heads = 1
    return config
