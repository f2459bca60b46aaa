"""Stages on the one Trainer: what `config.stage` changes (loss, batches, tokenizer), nothing else.

    config.stage = "pretrain" | "sft" | "dpo" | "grpo"
    Trainer(config, workdir, **trainer_kwargs(config)).run()     # what `python -m doge_jax.train` does

Chaining: a stage starts from the previous stage's checkpoint with `--config.init_from=PREVIOUS_WORKDIR`
(params only, fresh optimizer), or from a transformers model converted first with
`python -m convert from-hf --hf SmallDoge/Doge-20M --out ckpt` and `--config.init_from=ckpt`. DPO and GRPO use
that same checkpoint as their frozen reference unless `posttrain.reference` names another.

The tokenizer is the init checkpoint's own (WORKDIR/tokenizer) when it has one, else `config.data.tokenizer`;
the stage sets its chat template (`posttrain.chat_template`) and makes <|im_end|> its eos, and the Trainer saves
it into the new WORKDIR/tokenizer, which `convert to-hf` ships with the model.

DPO and GRPO hand the reference to the Trainer as `frozen={"reference": checkpoint}`: it is loaded sharded by
the policy's logical-axis rules and is an argument of the jitted step (never constants baked into the program),
so it scales with the mesh like the policy does.
"""

from __future__ import annotations

import functools
import ml_collections

from doge_jax.errors import ConfigError

STAGES = ("pretrain", "sft", "dpo", "grpo")


def posttrain_defaults(stage: str) -> ml_collections.ConfigDict:
    """The config fields a post-training stage adds: `config.posttrain`, plus `config.dpo` / `config.grpo`."""
    if stage not in STAGES[1:]:
        raise ValueError(f"stage={stage!r} must be one of {list(STAGES[1:])}")
    c = ml_collections.ConfigDict()
    c.posttrain = ml_collections.ConfigDict(dict(
        # 'builtin:NAME' (doge_jax/posttrain/datasets.py), .jsonl/.parquet files or globs, or a save_to_disk dir;
        # several joined by commas.
        dataset={"sft": "builtin:sft_mix", "dpo": "builtin:prefs", "grpo": "builtin:arith_prompts"}[stage],
        hf_split="train",  # split of a saved DatasetDict
        messages_field="messages",  # SFT: the key holding the conversation
        # 'auto': the tokenizer's own (the previous stage's choice), DEFAULT if it has none; 'tokenizer' (its own
        # or an error); 'default' (ChatML); 'thinking' (<think> … </think>, reasoning distillation); a .jinja file.
        chat_template="auto",
        packing=False,  # SFT: several conversations per row (segment ids keep them apart)
        eval_fraction=0.02,  # held out by a fixed permutation of the records
        tokenizer="",  # '' = the init checkpoint's tokenizer, else config.data.tokenizer
        reference="",  # DPO / GRPO: the frozen reference checkpoint; '' = config.init_from
    ))
    if stage == "dpo":
        c.dpo = ml_collections.ConfigDict(dict(
            beta=0.1,  # strength of the pull towards the reference (TRL's default)
            loss_type="sigmoid",  # sigmoid (DPO) | ipo
            label_smoothing=0.0,  # cDPO: assumed fraction of flipped preference labels (sigmoid only)
        ))
    if stage == "grpo":
        c.grpo = ml_collections.ConfigDict(dict(
            group_size=8,  # completions per prompt; advantages are normalised within the group
            max_prompt_len=64,  # prompts are left-padded to this; longer ones are skipped
            max_new_tokens=32,
            temperature=1.0,  # > 0: a group needs diverse completions
            top_k=0,
            top_p=1.0,
            clip_eps=0.2,
            kl_coef=0.04,  # β of the k3 KL penalty to the reference (DeepSeekMath's value)
            rewards="format,answer",  # names from rewards.py, comma-separated
            reward_weights="0.2,1.0",  # one per reward: the total is their weighted sum
        ))
    return c


def add_stage(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """Turns a pretraining config into a `stage` config (adds config.stage and the stage's fields)."""
    config.stage = stage
    if stage != "pretrain":
        config.update(posttrain_defaults(stage))
    return config


def _error(e: ValueError | str) -> ConfigError:
    """A stage setup error as a ConfigError (exit 2). Bad config values already are one, with their field."""
    return e if isinstance(e, ConfigError) else ConfigError(str(e))


def load_stage_tokenizer(config):
    from doge_jax import checkpoint as ckpt
    from doge_jax.posttrain.chat import set_chat_template
    from doge_jax.data.tokenizer import load_tokenizer

    spec = config.posttrain.tokenizer
    if not spec and config.init_from:
        try:
            spec = ckpt.resolve(config.init_from).tokenizer_dir or ""
        except (FileNotFoundError, ValueError):
            spec = ""  # the trainer reports a bad init_from with its own message
    try:
        tokenizer = load_tokenizer(spec or config.data.tokenizer)
        return set_chat_template(tokenizer, config.posttrain.chat_template)
    except ValueError as e:
        raise _error(e) from None


def _reference(config) -> str:
    """The frozen reference's checkpoint path, checked now (the Trainer loads it onto the mesh)."""
    from doge_jax import checkpoint as ckpt

    path = config.posttrain.reference or config.init_from
    if not path:
        raise _error(f"config.stage={config.stage!r} needs a frozen reference: set config.init_from (the previous "
                     "stage's workdir) or config.posttrain.reference")
    try:
        ckpt.load_config(ckpt.resolve(path))
    except (FileNotFoundError, ValueError) as e:
        raise _error(f"config.posttrain.reference: {e}") from None
    return path


def check(config) -> None:
    stage = config.get("stage", "pretrain")
    if stage not in STAGES:
        raise _error(f"config.stage={stage!r} must be one of {list(STAGES)}")
    if stage == "pretrain":
        return
    pt = config.posttrain
    if not 0.0 <= pt.eval_fraction < 1.0:
        raise _error(f"config.posttrain.eval_fraction={pt.eval_fraction} must be in [0, 1)")
    if stage == "dpo":
        from doge_jax.posttrain.dpo import LOSS_TYPES

        if config.dpo.loss_type not in LOSS_TYPES:
            raise _error(f"config.dpo.loss_type={config.dpo.loss_type!r} must be one of {list(LOSS_TYPES)}")
        if not config.dpo.beta > 0:
            raise _error(f"config.dpo.beta={config.dpo.beta} must be > 0")
        if not 0.0 <= config.dpo.label_smoothing < 0.5:
            raise _error(f"config.dpo.label_smoothing={config.dpo.label_smoothing} must be in [0, 0.5)")
    if stage == "grpo":
        g = config.grpo
        if not isinstance(g.group_size, int) or g.group_size < 2:
            raise _error(f"config.grpo.group_size={g.group_size!r} must be an integer >= 2 (advantages are "
                         "relative to the group)")
        if not g.temperature > 0:
            raise _error(f"config.grpo.temperature={g.temperature} must be > 0 (greedy groups are all alike)")
        if config.seq_len != g.max_prompt_len + g.max_new_tokens:
            raise _error(f"config.seq_len={config.seq_len} must equal grpo.max_prompt_len + grpo.max_new_tokens = "
                         f"{g.max_prompt_len + g.max_new_tokens} (the longest sequence the step scores)")
        from doge_jax.posttrain import rewards

        names = [n.strip() for n in g.rewards.split(",") if n.strip()]
        rewards.check_names(names)
        if len([w for w in g.reward_weights.split(",") if w.strip()]) != len(names):
            raise _error(f"config.grpo.reward_weights={g.reward_weights!r} needs one weight per reward "
                         f"({len(names)}: {names})")


def trainer_kwargs(config) -> dict:
    """The Trainer's loss_fn / batch_source / tokenizer (/ frozen) for config.stage ({} for pretraining)."""
    check(config)
    stage = config.get("stage", "pretrain")
    if stage == "pretrain":
        return {}
    tokenizer = load_stage_tokenizer(config)
    try:
        if stage == "sft":
            from doge_jax.posttrain import sft

            return {"loss_fn": functools.partial(sft.sft_loss, loss_chunk_tokens=config.loss_chunk_tokens),
                    "batch_source": sft.make_source(config, tokenizer),
                    "tokenizer": tokenizer}
        frozen = {"reference": _reference(config)}
        if stage == "dpo":
            from doge_jax.posttrain import dpo

            loss_fn = dpo.make_loss(beta=config.dpo.beta, loss_type=config.dpo.loss_type,
                                    label_smoothing=config.dpo.label_smoothing,
                                    loss_chunk_tokens=config.loss_chunk_tokens)
            return {"loss_fn": loss_fn, "batch_source": dpo.make_source(config, tokenizer), "tokenizer": tokenizer,
                    "frozen": frozen}
        from doge_jax.posttrain import grpo

        loss_fn, source = grpo.make_stage(config, tokenizer)
        return {"loss_fn": loss_fn, "batch_source": source, "tokenizer": tokenizer, "frozen": frozen}
    except ValueError as e:
        raise _error(e) from None
