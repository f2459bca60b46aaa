"""Small building blocks: dense projections, RMSNorm, the gated MLP.

Parameters are float32 master weights with transformers' initialisation (normal(0, initializer_range) for
weights, zeros for biases, ones for norms); `dtype` is the compute dtype of the matmuls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from doge_jax.model.options import ACTIVATIONS
from doge_jax.parallel import sharding as sh


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel [in, out] — the transpose of torch's Linear.weight."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, logical_axes: tuple,
                 init_std: float, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), (in_features, out_features)),
                                logical_axes=logical_axes)
        self.bias = nnx.Param(jnp.zeros((out_features,)), logical_axes=logical_axes[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """transformers' DogeRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float, logical_axes: tuple = (None,)):
        self.weight = nnx.Param(jnp.ones((dim,)), logical_axes=logical_axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * x32.astype(x.dtype)).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BlockOutput:
    """What a feed-forward block returns, dense or MoE alike: its output [B, T, D], and for CDMoE what it routed
    (a `moe_reference.Routing`; None for the dense MLP)."""

    out: jax.Array
    routing: Any = None


class MLP(nnx.Module):
    """down(act(gate(x)) * up(x)), as a BlockOutput."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        dense = functools.partial(Dense, use_bias=cfg.mlp_bias, init_std=cfg.initializer_range, dtype=dtype,
                                  rngs=rngs)
        self.gate_proj = dense(D, F, logical_axes=(sh.EMBED, sh.MLP))
        self.up_proj = dense(D, F, logical_axes=(sh.EMBED, sh.MLP))
        self.down_proj = dense(F, D, logical_axes=(sh.MLP, sh.EMBED))
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> BlockOutput:
        return BlockOutput(out=self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))
