"""Doge-20M DPO after SFT: the SFT checkpoint is the start and the frozen reference.

    python -m doge_jax.train --config=configs/doge_20m_dpo.py --workdir=runs/doge-20m-dpo \\
        --config.init_from=runs/doge-20m-sft --config.posttrain.dataset=prefs.jsonl

Records are {"prompt", "chosen", "rejected"} (strings or TRL's conversational lists).
"""

from doge_jax.configs import doge_20m
from doge_jax.posttrain import add_stage


def get_config():
    config = add_stage(doge_20m.get_config(), "dpo")
    config.seq_len = 1024  # prompt + reply; longer pairs are cut
    config.batch_size = 32  # pairs
    config.total_steps = 1000
    config.optimizer.lr = 8e-5  # the seed recipe's DPO LR for 20M
    config.optimizer.weight_decay = 0.0
    config.schedule.warmup_steps = 50
    config.schedule.decay_fraction = 0.1
    config.dpo.beta = 0.1
    config.checkpoint.every_steps = 250
    config.eval_every = 250
    config.eval_batches = 8
    return config
