"""Doge-20M: 13.1M parameters with the 32768 vocab (tied). Published shape: 8 layers, hidden 256, ff 512, 2 heads / 1 kv heads."""

from doge_jax.configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.num_hidden_layers = 8
    m.hidden_size = 256
    m.intermediate_size = 512
    m.num_attention_heads = 2
    base.doge_architecture(m, num_key_value_heads=1)  # tied embeddings, dynamic NTK RoPE ×4, GQA
    # The seed recipe: 4B tokens = 8000 steps x 256 sequences x 2048, WSD decaying over the last 10 %.
    config.optimizer.lr = 0.008
    config.total_steps = 8000
    config.batch_size = 256
    return config
