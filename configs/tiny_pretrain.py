"""The tiny chain, stage 1: pretraining a 2-layer Doge on the default corpus (CPU, a minute).

    python -m doge_jax.train --config=configs/tiny_pretrain.py --workdir=/tmp/chain/pretrain

The next stages start from it: configs/tiny_sft.py → tiny_dpo.py → tiny_grpo.py (each with
--config.init_from=<previous workdir>). Sizes are for speed on 2 cores, not quality.
"""

from doge_jax.configs import doge_tiny


def tiny_model(m):
    """2 layers, hidden 64 on the shipped 8192-token vocabulary: compiles in seconds."""
    m.num_hidden_layers = 2
    m.hidden_size = 64
    m.intermediate_size = 128
    m.num_attention_heads = 4
    m.num_key_value_heads = 2
    m.max_position_embeddings = 256
    m.keep_window_size = 128


def tiny_run(config, *, steps: int, lr: float):
    """Run-level fields shared by every tiny stage: short, quiet, checkpoint only at the end."""
    config.total_steps = steps
    config.optimizer.lr = lr
    config.schedule.warmup_steps = max(1, steps // 10)
    config.schedule.decay_steps = 0
    config.log_every = max(1, steps // 5)
    config.eval_every = 0
    config.checkpoint.every_steps = 0
    config.checkpoint.keep = 1
    config.checkpoint.async_save = False
    config.progress_bar = False
    config.tensorboard = False
    config.peak_tflops = 1.0  # skip the CPU GEMM measurement (MFU is meaningless here)


def get_config():
    config = doge_tiny.get_config()
    tiny_model(config.model)
    config.stage = "pretrain"
    config.seq_len = 128
    config.batch_size = 8
    config.data.max_documents = 300  # tokenizing the whole default corpus would dominate the run
    tiny_run(config, steps=20, lr=3e-3)
    return config
