"""Checks of the training config that need no devices or files: one-line errors naming the field.

Everything here raises `ConfigError` (a ValueError); the entry point prints it without a traceback.
"""

from __future__ import annotations

import dataclasses
import math

from doge_jax.errors import ConfigError
from doge_jax.model import config as config_lib
from doge_jax.model.config import DogeConfig
from doge_jax.trainer import optim

# Fields that change how the model is computed but not its parameters (DogeConfig's `runtime` metadata): a run
# that starts from a checkpoint (config.init_from) takes the architecture from the checkpoint, these from
# config.model.
RUNTIME_FIELDS = tuple(f.name for f in config_lib.fields(runtime=True))


__all__ = ["ConfigError", "RUNTIME_FIELDS", "architecture_diff", "check", "check_parallelism", "model_config",
           "with_runtime_fields"]


def model_config(model_cfg) -> DogeConfig:
    """config.model (a ConfigDict or dict) → DogeConfig, with errors prefixed by `config.model.`."""
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    try:
        return DogeConfig.from_dict(d)
    except config_lib.ConfigFieldError as e:  # its message starts with "field=value"
        raise ConfigError(f"config.model.{e}", field=f"model.{e.field}") from None
    except TypeError as e:
        raise ConfigError(f"config.model: {e}") from None


def with_runtime_fields(arch: DogeConfig, model_cfg) -> DogeConfig:
    """The checkpoint's architecture with config.model's runtime fields."""
    return arch.replace(**{f: model_cfg[f] for f in RUNTIME_FIELDS})


def architecture_diff(a: DogeConfig, b: DogeConfig) -> list[tuple[str, object, object]]:
    """Fields (other than runtime ones) where a and b differ."""
    return [(f.name, getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(DogeConfig)
            if f.name not in RUNTIME_FIELDS and getattr(a, f.name) != getattr(b, f.name)]


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config.{name}={value!r} must be a positive integer")


def _non_negative_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"config.{name}={value!r} must be an integer >= 0")


def _in_range(name: str, value, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ConfigError(f"config.{name}={value!r} must be in {'(' if lo_open else '['}{lo}, {hi}"
                          f"{')' if hi_open else ']'}")


def check(config, model_cfg: DogeConfig) -> None:
    """The run-level checks (batch, schedule, optimizer, intervals, sequence length)."""
    for name in ("total_steps", "batch_size", "seq_len", "log_every", "eval_batches"):
        _positive_int(name, config[name])
    if config.grad_accum_steps != "auto":
        if not isinstance(config.grad_accum_steps, int) or isinstance(config.grad_accum_steps, bool) \
                or config.grad_accum_steps < 1:
            raise ConfigError(f"config.grad_accum_steps={config.grad_accum_steps!r} must be 'auto' (the fewest "
                              "micro-batches that fit the device) or a positive integer")
    if config.memory_limit_gb < 0:
        raise ConfigError(f"config.memory_limit_gb={config.memory_limit_gb} must be >= 0 (0 = the device's memory)")
    if not isinstance(config.loss_chunk_tokens, int) or config.loss_chunk_tokens < -1:
        raise ConfigError(f"config.loss_chunk_tokens={config.loss_chunk_tokens!r} must be a positive integer, 0 "
                          "(about 2^26 logits per chunk) or -1 (the whole batch's logits at once)")
    for name in ("eval_every", "data_shards", "checkpoint.every_steps", "checkpoint.keep", "schedule.warmup_steps"):
        group, _, field = name.rpartition(".")
        _non_negative_int(name, (config[group] if group else config)[field])
    if config.seq_len < 2:
        raise ConfigError(f"config.seq_len={config.seq_len} must be >= 2 (an input and its next-token target)")
    if config.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"config.seq_len={config.seq_len} exceeds config.model.max_position_embeddings="
                          f"{model_cfg.max_position_embeddings}")
    if config.grad_accum_steps != "auto" and config.batch_size % config.grad_accum_steps:
        raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                          f"config.grad_accum_steps={config.grad_accum_steps}")
    opt = config.optimizer
    _in_range("optimizer.lr", opt.lr, 0.0, 1.0, lo_open=True)
    _in_range("optimizer.b1", opt.b1, 0.0, 1.0, hi_open=True)
    _in_range("optimizer.b2", opt.b2, 0.0, 1.0, hi_open=True)
    _in_range("optimizer.eps", opt.eps, 0.0, 1.0, lo_open=True)
    _in_range("optimizer.weight_decay", opt.weight_decay, 0.0, 1.0)
    if opt.clip_norm < 0:
        raise ConfigError(f"config.optimizer.clip_norm={opt.clip_norm} must be >= 0 (0 = no clipping)")
    if config.z_loss_coef < 0:
        raise ConfigError(f"config.z_loss_coef={config.z_loss_coef} must be >= 0")
    sched = config.schedule
    if sched.decay_type not in optim.DECAY_TYPES:
        raise ConfigError(f"config.schedule.decay_type={sched.decay_type!r} must be one of {list(optim.DECAY_TYPES)}")
    _in_range("schedule.min_lr_ratio", sched.min_lr_ratio, 0.0, 1.0)
    _in_range("schedule.decay_fraction", sched.decay_fraction, 0.0, 1.0)
    if sched.decay_steps < -1:
        raise ConfigError(f"config.schedule.decay_steps={sched.decay_steps} must be >= 0, or -1 (decay_fraction)")
    decay = optim.decay_steps(config)
    if sched.warmup_steps + decay > config.total_steps:
        raise ConfigError(f"config.schedule.warmup_steps={sched.warmup_steps} + decay steps {decay} exceed "
                          f"config.total_steps={config.total_steps}")
    _non_negative_int("eval_tasks_limit", config.eval_tasks_limit)
    if config.eval_tasks and config.eval_every == 0:
        raise ConfigError(f"config.eval_tasks={config.eval_tasks!r} needs config.eval_every > 0 (when to score them)")
    if config.init_from and config.resume_from:
        raise ConfigError(f"config.init_from={config.init_from!r} and config.resume_from={config.resume_from!r} "
                          "exclude each other (params only vs everything)")
    if config.profile.start_step >= 0:
        _positive_int("profile.num_steps", config.profile.num_steps)


def check_parallelism(config, *, data_parallel: int, data_shards: int) -> int:
    """The micro-batch must split evenly over the data-parallel devices and over the data shards. Returns the
    multiple every micro-batch's rows must be (what grad_accum_steps "auto" may choose from)."""
    row_multiple = math.lcm(data_parallel, data_shards)
    if config.grad_accum_steps == "auto":
        if config.batch_size % row_multiple:
            raise ConfigError(
                f"config.batch_size={config.batch_size} is not divisible by the {data_parallel} data-parallel "
                f"devices (config.mesh data × fsdp × expert) and {data_shards} data shards: it must be a multiple "
                f"of {row_multiple}")
        return row_multiple
    micro = config.batch_size // config.grad_accum_steps
    if micro % data_parallel:
        raise ConfigError(
            f"config.batch_size={config.batch_size} / config.grad_accum_steps={config.grad_accum_steps} = "
            f"{micro} rows per micro-batch, not divisible by the {data_parallel} data-parallel devices "
            "(config.mesh data × fsdp × expert)")
    if micro % data_shards:
        raise ConfigError(
            f"config.batch_size={config.batch_size} / config.grad_accum_steps={config.grad_accum_steps} = "
            f"{micro} rows per micro-batch, not divisible by {data_shards} data shards (config.data_shards, "
            "0 = one per process)")
    return row_multiple
