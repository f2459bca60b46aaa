"""Post-training on the pretraining Trainer: SFT on chats, DPO on preference pairs, GRPO with verifiable rewards.

    from doge_jax.posttrain import trainer_kwargs
    Trainer(config, workdir, **trainer_kwargs(config)).run()      # config.stage: pretrain | sft | dpo | grpo

Pure losses (unit-tested): `dpo_loss`, `grpo_objective`, `group_advantages`; SFT is pretraining's masked
cross-entropy on rows whose targets are −100 off the assistant tokens. Chat handling: `encode_chat`,
`set_chat_template` (DEFAULT / THINKING templates). Offline datasets: `builtin(name)`.
"""

from doge_jax.posttrain.chat import THINKING_TEMPLATE, encode_chat, encode_prompt, set_chat_template
from doge_jax.posttrain.datasets import builtin
from doge_jax.posttrain.dpo import dpo_loss, sequence_logps
from doge_jax.posttrain.grpo import grpo_objective, group_advantages
from doge_jax.posttrain.stages import STAGES, add_stage, posttrain_defaults, trainer_kwargs

__all__ = ["STAGES", "THINKING_TEMPLATE", "add_stage", "builtin", "dpo_loss", "encode_chat", "encode_prompt",
           "group_advantages", "grpo_objective", "posttrain_defaults", "sequence_logps", "set_chat_template",
           "trainer_kwargs"]
