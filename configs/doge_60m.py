"""Doge-60M: 54M parameters. Published shape: 16 layers, hidden 512, ff 1024, 4 heads / 2 kv heads."""

from doge_jax.configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.num_hidden_layers = 16
    m.hidden_size = 512
    m.intermediate_size = 1024
    m.num_attention_heads = 4
    base.doge_architecture(m, num_key_value_heads=2)  # tied embeddings, dynamic NTK RoPE ×4, GQA
    # The seed recipe: 16B tokens = 16000 steps x 512 sequences x 2048, WSD decaying over the last 10 %.
    config.optimizer.lr = 0.006
    config.total_steps = 16000
    config.batch_size = 512
    return config
