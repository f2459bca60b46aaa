"""The tiny chain, stage 2: SFT on the built-in chats and arithmetic, from the tiny pretraining run.

    python -m doge_jax.train --config=configs/tiny_sft.py --workdir=/tmp/chain/sft \\
        --config.init_from=/tmp/chain/pretrain
"""

from doge_jax.configs import tiny_pretrain
from doge_jax.posttrain import add_stage


def get_config():
    config = add_stage(tiny_pretrain.get_config(), "sft")
    config.seq_len = 128
    config.batch_size = 16
    config.posttrain.dataset = "builtin:sft_mix"
    config.posttrain.packing = True  # short chats: ~4 per 128-token row
    tiny_pretrain.tiny_run(config, steps=30, lr=2e-3)
    return config
