"""Doge-320M: 335M parameters. Published shape: 32 layers, hidden 1024, ff 2048, 8 heads / 4 kv heads."""

from doge_jax.configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.num_hidden_layers = 32
    m.hidden_size = 1024
    m.intermediate_size = 2048
    m.num_attention_heads = 8
    base.doge_architecture(m, num_key_value_heads=4)  # tied embeddings, dynamic NTK RoPE ×4, GQA
    # The seed recipe: 64B tokens = 32000 steps x 1024 sequences x 2048, WSD decaying over the last 10 %.
    config.optimizer.lr = 0.002
    config.total_steps = 32000
    config.batch_size = 1024
    return config
