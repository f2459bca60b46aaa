"""The model's configuration: a frozen, validated dataclass, and the one source of truth for every field.

Each field carries its default, its allowed values and what it is elsewhere in `dataclasses.field(metadata=...)`:
- `hf`: its name in transformers' `DogeConfig` (config.json). Dotted names live inside a dict there
  (`rope_parameters.factor`). `OPTION` marks a doge-jax option transformers has no key for: it travels in
  config.json as `doge_jax_<name>` (transformers keeps such keys and ignores them). None: not exported.
- `runtime`: it changes how the model is computed, not its parameters (dtype, remat, attention_impl, dropout,
  loss weights). A run started from a checkpoint takes the architecture from the checkpoint and these from the
  run's config.
- `choices`: the allowed values, where the field is an enumeration.
`configs/base.py`, the converter's field maps (`convert/hf.py`) and the trainer's validation all derive from this
table, so adding a field means adding it here (and implementing it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from doge_jax.model.options import ACTIVATIONS, ATTENTION_IMPLS, MOE_IMPLS, REMAT_POLICIES

OPTION = "option"  # metadata hf=OPTION: stored in config.json as OPTION_PREFIX + name
OPTION_PREFIX = "doge_jax_"


def _field(default, *, hf: str | None, runtime: bool = False, choices: tuple | None = None):
    return dataclasses.field(default=default, metadata={"hf": hf, "runtime": runtime, "choices": choices})


class ConfigFieldError(ValueError):
    """A bad DogeConfig value. `field` is the field's name; the message starts with `field=value`."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class DogeConfig:
    """Every field that changes the math of transformers' DogeForCausalLM, plus doge-jax options."""

    vocab_size: int = _field(32768, hf="vocab_size")
    hidden_size: int = _field(1024, hf="hidden_size")
    intermediate_size: int = _field(2048, hf="intermediate_size")
    num_hidden_layers: int = _field(32, hf="num_hidden_layers")
    num_attention_heads: int = _field(8, hf="num_attention_heads")
    num_key_value_heads: int | None = _field(None, hf="num_key_value_heads")  # None → MHA, as in transformers
    head_dim: int | None = _field(None, hf="head_dim")  # None → hidden_size // num_attention_heads
    hidden_dropout: float = _field(0.0, hf="hidden_dropout", runtime=True)
    attention_dropout: float = _field(0.0, hf="attention_dropout", runtime=True)
    hidden_act: str = _field("silu", hf="hidden_act", choices=tuple(ACTIVATIONS))
    initializer_range: float = _field(0.02, hf="initializer_range")
    rms_norm_eps: float = _field(1e-6, hf="rms_norm_eps")
    tie_word_embeddings: bool = _field(False, hf="tie_word_embeddings")
    max_position_embeddings: int = _field(2048, hf="max_position_embeddings")
    rope_theta: float = _field(10000.0, hf="rope_parameters.rope_theta")
    rope_type: str = _field("default", hf="rope_parameters.rope_type", choices=("default", "linear", "dynamic"))
    rope_factor: float = _field(1.0, hf="rope_parameters.factor")  # for linear / dynamic
    attention_bias: bool = _field(False, hf="attention_bias")
    mlp_bias: bool = _field(False, hf="mlp_bias")
    sliding_window: int | None = _field(None, hf="sliding_window")
    keep_window_size: int = _field(2048, hf="keep_window_size")
    is_moe: bool = _field(False, hf="is_moe")
    num_experts: int = _field(16384, hf="num_experts")
    num_experts_per_tok: int = _field(64, hf="num_experts_per_tok")
    norm_topk_prob: bool = _field(False, hf="norm_topk_prob")
    router_aux_loss_coef: float = _field(0.001, hf="router_aux_loss_coef", runtime=True)
    pad_token_id: int | None = _field(None, hf="pad_token_id")
    bos_token_id: int | None = _field(None, hf="bos_token_id")
    eos_token_id: int | list[int] | None = _field(None, hf="eos_token_id")
    # --- doge-jax options -------------------------------------------------------------------------------------
    # Older SmallDoge checkpoints (Doge-60M/160M/320M as first published): no q/k RMSNorm and `A`/`dt_proj` sized
    # by the attention heads. transformers 5 uses qk_norm=True, dt_heads="kv".
    qk_norm: bool = _field(True, hf=OPTION)
    dt_heads: str = _field("kv", hf=OPTION, choices=("kv", "attention"))
    # transformers reshapes router logits with view(2, B*T, -1), pairing scores of different tokens in a full
    # forward. "transformers" reproduces that (imported checkpoints); "per_token" keeps routing causal (training).
    router_layout: str = _field("per_token", hf=OPTION, choices=("per_token", "transformers"))
    router_z_loss_coef: float = _field(0.0, hf=OPTION, runtime=True)
    attention_impl: str = _field("auto", hf=None, runtime=True, choices=ATTENTION_IMPLS)
    moe_impl: str = _field("auto", hf=None, runtime=True, choices=MOE_IMPLS)
    # Expert-parallel only: each expert shard computes at most ceil(capacity_factor · pairs / n) of its group's
    # (token, expert) pairs and drops the rest (counted in moe/dropped_fraction); 0 = every pair, exactly as the
    # reference (each shard then scans all n·share pairs). 1.25 is the usual choice (Switch Transformer).
    capacity_factor: float = _field(0.0, hf=None, runtime=True)
    # Activation / matmul dtype; parameters are always float32 (master weights).
    dtype: str = _field("float32", hf=None, runtime=True, choices=("float32", "bfloat16", "float16"))
    remat_policy: str = _field("none", hf=None, runtime=True, choices=tuple(REMAT_POLICIES))

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            _positive("num_attention_heads", self.num_attention_heads)
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "keep_window_size"):
            _positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigFieldError("num_attention_heads", f"num_attention_heads={self.num_attention_heads} must be a "
                                   f"multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigFieldError("head_dim", f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None:
            _positive("sliding_window", self.sliding_window)
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigFieldError(name, f"{name}={getattr(self, name)} must be in [0, 1)")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices is not None and getattr(self, f.name) not in choices:
                raise ConfigFieldError(f.name, f"{f.name}={getattr(self, f.name)!r} must be one of {list(choices)}")
        if self.rope_type != "default" and not self.rope_factor >= 1.0:
            raise ConfigFieldError("rope_factor", f"rope_factor={self.rope_factor} must be >= 1 for "
                                   f"rope_type={self.rope_type!r}")
        if not (self.capacity_factor == 0 or self.capacity_factor >= 1):
            raise ConfigFieldError("capacity_factor", f"capacity_factor={self.capacity_factor} must be 0 (no "
                                   "dropping) or >= 1 (below 1 drops pairs even when the experts are balanced)")
        if self.rms_norm_eps <= 0:
            raise ConfigFieldError("rms_norm_eps", f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        if self.is_moe:
            _positive("num_experts", self.num_experts)
            _positive("num_experts_per_tok", self.num_experts_per_tok)
            if self.num_keys < 1 or self.num_experts_per_tok > self.num_keys**2:
                raise ConfigFieldError("num_experts_per_tok", f"num_experts_per_tok={self.num_experts_per_tok} "
                                       f"must be <= num_keys**2={self.num_keys**2} (num_keys = "
                                       f"floor(sqrt(num_experts={self.num_experts})))")

    # --- derived -----------------------------------------------------------------------------------------------
    @property
    def num_keys(self) -> int:
        """Product-key side length: experts are indexed by (x, y) in [num_keys]², as in transformers."""
        return math.isqrt(self.num_experts)

    @property
    def num_dt_heads(self) -> int:
        return self.num_key_value_heads if self.dt_heads == "kv" else self.num_attention_heads

    def replace(self, **changes: Any) -> "DogeConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DogeConfig":
        """Builds from a plain dict (e.g. an ml_collections ConfigDict's to_dict()); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigFieldError(unknown[0], f"model config has unknown field(s) {unknown}; valid fields: "
                                   f"{sorted(names)}")
        return cls(**dict(d))


def fields(*, runtime: bool | None = None, hf: bool | None = None) -> tuple[dataclasses.Field, ...]:
    """DogeConfig's fields, optionally only the runtime (or architecture) ones, or those exported to config.json."""
    out = dataclasses.fields(DogeConfig)
    if runtime is not None:
        out = tuple(f for f in out if f.metadata["runtime"] == runtime)
    if hf is not None:
        out = tuple(f for f in out if (f.metadata["hf"] is not None) == hf)
    return out


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigFieldError(name, f"{name}={value!r} must be a positive integer")
