"""The tiny chain, stage 4: GRPO on built-in arithmetic prompts with format + answer rewards.

    python -m doge_jax.train --config=configs/tiny_grpo.py --workdir=/tmp/chain/grpo --config.init_from=/tmp/chain/dpo
"""

from doge_jax.configs import tiny_pretrain
from doge_jax.posttrain import add_stage


def get_config():
    config = add_stage(tiny_pretrain.get_config(), "grpo")
    g = config.grpo
    g.group_size = 4
    g.max_prompt_len = 40  # the arithmetic prompts are ~25 tokens with the chat template
    g.max_new_tokens = 24  # "a + b = c. The answer is c." and <|im_end|>
    config.seq_len = g.max_prompt_len + g.max_new_tokens
    config.batch_size = 4  # prompts per step (x group_size completions)
    config.posttrain.dataset = "builtin:arith_prompts"
    tiny_pretrain.tiny_run(config, steps=4, lr=1e-4)
    return config
