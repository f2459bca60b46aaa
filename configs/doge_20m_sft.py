"""Doge-20M instruction SFT (the seed recipe's first post-training stage), on the 20M preset.

    python -m convert from-hf --hf SmallDoge/Doge-20M --out ckpt/doge-20m        # or a pretraining workdir
    python -m doge_jax.train --config=configs/doge_20m_sft.py --workdir=runs/doge-20m-sft \\
        --config.init_from=ckpt/doge-20m --config.posttrain.dataset=chats.jsonl

The architecture and tokenizer come from init_from. The built-in dataset is a smoke test; real runs name chat
data (jsonl / parquet with a `messages` column, or a save_to_disk folder). Continue with doge_20m_dpo.py.
"""

from doge_jax.configs import doge_20m
from doge_jax.posttrain import add_stage


def get_config():
    config = add_stage(doge_20m.get_config(), "sft")
    config.seq_len = 2048
    config.batch_size = 64  # ~131k tokens per step with packing
    config.posttrain.packing = True
    config.total_steps = 2000
    config.optimizer.lr = 8e-4  # the seed recipe's SFT LR for 20M
    config.schedule.warmup_steps = 100
    config.schedule.decay_fraction = 0.1
    config.checkpoint.every_steps = 500
    config.eval_every = 500
    config.eval_batches = 8
    return config
