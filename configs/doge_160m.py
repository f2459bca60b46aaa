"""Doge-160M: 152M parameters. Published shape: 24 layers, hidden 768, ff 1536, 6 heads / 3 kv heads."""

from doge_jax.configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.num_hidden_layers = 24
    m.hidden_size = 768
    m.intermediate_size = 1536
    m.num_attention_heads = 6
    base.doge_architecture(m, num_key_value_heads=3)  # tied embeddings, dynamic NTK RoPE ×4, GQA
    # The seed recipe: 32B tokens = 24000 steps x 640 sequences x 2048, WSD decaying over the last 10 %.
    config.optimizer.lr = 0.004
    config.total_steps = 24000
    config.batch_size = 640
    return config
