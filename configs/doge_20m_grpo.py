"""Doge-20M GRPO with verifiable rewards, after (distillation) SFT.

    python -m doge_jax.train --config=configs/doge_20m_grpo.py --workdir=runs/doge-20m-grpo \\
        --config.init_from=runs/doge-20m-sft --config.posttrain.dataset=math_prompts.jsonl

Records are {"prompt", "answer"}; the rewards check "The answer is N." (rewards.py). After a thinking-template
SFT, add --config.grpo.rewards=think_format,answer (the template travels with the tokenizer).
"""

from doge_jax.configs import doge_20m
from doge_jax.posttrain import add_stage


def get_config():
    config = add_stage(doge_20m.get_config(), "grpo")
    g = config.grpo
    g.group_size = 8
    g.max_prompt_len = 256
    g.max_new_tokens = 256
    g.temperature = 1.0
    g.kl_coef = 0.04
    config.seq_len = g.max_prompt_len + g.max_new_tokens
    config.batch_size = 16  # prompts per step: 128 completions
    config.total_steps = 500
    config.optimizer.lr = 1e-5
    config.optimizer.weight_decay = 0.0
    config.schedule.warmup_steps = 20
    config.schedule.decay_fraction = 0.0
    config.checkpoint.every_steps = 100
    config.eval_every = 0  # held-out reward: sample with `python -m doge_jax.generate` or the reward script
    return config
