"""The model's configuration: a frozen, validated dataclass.

Field names follow transformers' `DogeConfig` so the converter is a plain mapping; the fields after
`router_aux_loss_coef` are doge-jax options that transformers' config has no key for (they travel in
config.json under a `doge_jax_` prefix, which transformers keeps and ignores).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "tanh")
ROPE_TYPES = ("default", "linear", "dynamic")
ATTENTION_IMPLS = ("xla", "pallas", "auto")
ROUTER_LAYOUTS = ("per_token", "transformers")
DT_HEADS = ("kv", "attention")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


@dataclasses.dataclass(frozen=True)
class DogeConfig:
    """Every field that changes the math of transformers' DogeForCausalLM, plus doge-jax options."""

    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 32
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None → num_attention_heads (MHA), as in transformers.
    head_dim: int | None = None  # None → hidden_size // num_attention_heads.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"  # transformers' rope_parameters["rope_type"].
    rope_factor: float = 1.0  # rope_parameters["factor"] for linear / dynamic.
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    keep_window_size: int = 2048
    is_moe: bool = False
    num_experts: int = 16384
    num_experts_per_tok: int = 64
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # --- doge-jax options -------------------------------------------------------------------------------------
    # Older SmallDoge checkpoints (Doge-60M/160M/320M as first published): no q/k RMSNorm and `A`/`dt_proj` sized
    # by the attention heads. transformers 5 uses qk_norm=True, dt_heads="kv".
    qk_norm: bool = True
    dt_heads: str = "kv"
    # transformers reshapes router logits with view(2, B*T, -1), pairing scores of different tokens in a full
    # forward. "transformers" reproduces that (imported checkpoints); "per_token" keeps routing causal (training).
    router_layout: str = "per_token"
    router_z_loss_coef: float = 0.0
    attention_impl: str = "xla"
    dtype: str = "float32"  # activation / matmul dtype; parameters are always float32 (master weights).
    remat_policy: str = "none"

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
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None:
            _positive("sliding_window", self.sliding_window)
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        _choice("hidden_act", self.hidden_act, ACTIVATIONS)
        _choice("rope_type", self.rope_type, ROPE_TYPES)
        _choice("dt_heads", self.dt_heads, DT_HEADS)
        _choice("router_layout", self.router_layout, ROUTER_LAYOUTS)
        _choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        if self.rope_type != "default" and not self.rope_factor >= 1.0:
            raise ValueError(f"rope_factor={self.rope_factor} must be >= 1 for rope_type={self.rope_type!r}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        if self.is_moe:
            _positive("num_experts", self.num_experts)
            _positive("num_experts_per_tok", self.num_experts_per_tok)
            if self.num_keys < 1 or self.num_experts_per_tok > self.num_keys**2:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be <= num_keys**2="
                                 f"{self.num_keys**2} (num_keys = floor(sqrt(num_experts={self.num_experts})))")

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
            raise ValueError(f"model config has unknown field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**dict(d))


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {list(choices)}")
