"""A tiny Doge that learns visibly within minutes on 2 CPU cores (the README's main-job example)."""

from doge_jax.configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.vocab_size = 8192  # the shipped default tokenizer's vocabulary
    m.num_hidden_layers = 4
    m.hidden_size = 128
    m.intermediate_size = 256
    m.num_attention_heads = 4
    base.doge_architecture(m, num_key_value_heads=2)  # tied embeddings, dynamic NTK RoPE ×4, GQA
    m.max_position_embeddings = 256
    m.keep_window_size = 128

    # ~2–3 minutes on 2 CPU cores: 600 steps of 16 × 128 tokens (seq_len ≤ keep_window_size: no top-k needed).
    config.seq_len = 128
    config.batch_size = 16
    config.total_steps = 600
    config.optimizer.lr = 5e-3
    config.schedule.warmup_steps = 30  # then stable, and a linear decay over the last 10 % as the seed recipe
    config.log_every = 10
    config.eval_every = 100
    config.eval_batches = 8
    config.checkpoint.every_steps = 100
    return config
