"""A tiny Doge-MoE: doge_tiny's trunk with a CDMoE of 256 rank-1 experts (16² product keys), top-8.

Small enough to train for a few steps on CPU fake devices with the expert axis split up to 8 ways
(256 / 8 = 32 experts per shard)."""

from doge_jax.configs import doge_tiny


def get_config():
    config = doge_tiny.get_config()
    m = config.model
    m.is_moe = True
    m.num_experts = 256
    m.num_experts_per_tok = 8
    return config
