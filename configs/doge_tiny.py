"""A tiny Doge that learns visibly within minutes on 2 CPU cores (the README's main-job example)."""

from configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.vocab_size = 8192  # the shipped default tokenizer's vocabulary
    m.num_hidden_layers = 4
    m.hidden_size = 128
    m.intermediate_size = 256
    m.num_attention_heads = 4
    m.num_key_value_heads = 2
    m.max_position_embeddings = 256
    m.keep_window_size = 128
    return config
