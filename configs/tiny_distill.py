"""Reasoning distillation, tiny: SFT with the thinking template on worked arithmetic (`reasoning_content`).

    python -m doge_jax.train --config=configs/tiny_distill.py --workdir=/tmp/chain/distill \\
        --config.init_from=/tmp/chain/pretrain

The tokenizer saved with the run carries the thinking template, so a following GRPO stage
(configs/tiny_grpo.py with --config.grpo.rewards=think_format,answer) keeps it (chat_template 'auto').
"""

from doge_jax.configs import tiny_pretrain
from doge_jax.posttrain import add_stage


def get_config():
    config = add_stage(tiny_pretrain.get_config(), "sft")
    config.seq_len = 128
    config.batch_size = 16
    config.posttrain.dataset = "builtin:arith_think"
    config.posttrain.chat_template = "thinking"
    config.posttrain.packing = True
    tiny_pretrain.tiny_run(config, steps=30, lr=2e-3)
    return config
