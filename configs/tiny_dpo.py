"""The tiny chain, stage 3: DPO on the built-in preference pairs; the SFT checkpoint is policy and reference.

    python -m doge_jax.train --config=configs/tiny_dpo.py --workdir=/tmp/chain/dpo --config.init_from=/tmp/chain/sft
"""

from doge_jax.configs import tiny_pretrain
from doge_jax.posttrain import add_stage


def get_config():
    config = add_stage(tiny_pretrain.get_config(), "dpo")
    config.seq_len = 64  # the longest built-in pair is ~50 tokens
    config.batch_size = 8  # pairs
    config.posttrain.dataset = "builtin:prefs"
    config.dpo.beta = 0.1
    tiny_pretrain.tiny_run(config, steps=10, lr=5e-4)
    return config
