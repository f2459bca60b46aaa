"""Dense → MoE continuation: a CDMoE model that starts from a trained dense Doge checkpoint.

    python -m doge_jax.cli.continuation --dense runs/dense --out runs/moe_init --num-experts 1024 --top-k 8

Every dense parameter is copied: embeddings, attention, norms, residual scales, and each layer's MLP, which
becomes the CDMoE's shared MLP (CDMoE subclasses MLP, so `layers.i.mlp.{gate,up,down}_proj` keep their names).
New per layer, with transformers' init normal(0, initializer_range): `mlp.router_gate.kernel` [D, 2·num_keys]
and the expert tables `mlp.down_embed`, `mlp.up_embed` [num_experts, D]. The result is an ordinary checkpoint
(doge_jax.checkpoint layout, step 0, the dense tokenizer copied): training starts from it like from any
checkpoint, and `python -m convert to-hf` exports it (transformers loads it with is_moe=True).

What the MoE model computes at step 0. Each layer's feed-forward is

    CDMoE(x) = MLP_dense(x) + Σ_{e ∈ top-k(x)} w_e(x) · act(⟨down_embed[e], x⟩) · up_embed[e]

so the model is the dense model plus one freshly initialised expert term per layer, propagated through the
later layers. With σ = initializer_range: ⟨down[e], x⟩ ~ N(0, σ²‖x‖²), act ≈ z/2 near 0 and up[e] ~ N(0, σ²),
so each entry of the term is about σ²·‖x‖/2 · sqrt(Σ_k w_k²) — measured rms(term)/rms(x) = 8e-4 at D = 64,
σ = 0.02, top-4 (tests/test_moe_continuation.py prints it, and the resulting logit change). With
`--zero-up-embed` the term is exactly 0 and the MoE model computes the dense function bit for bit; up_embed
still gets gradient at step 0 (act(⟨down, x⟩)·w ≠ 0), the router and down_embed from step 1 on.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from doge_jax import checkpoint as ckpt
from doge_jax.model import decoder as model_lib
from doge_jax.model.config import DogeConfig

# Parameters a CDMoE layer has and a dense layer does not (path suffixes under layers.<i>.mlp).
NEW_MOE_PARAMS = (("router_gate", "kernel"), ("down_embed",), ("up_embed",))


def moe_config_from_dense(dense: DogeConfig, *, num_experts: int, top_k: int, **changes) -> DogeConfig:
    """The dense config with a CDMoE in every layer (`changes`: other MoE fields, e.g. router_layout)."""
    if dense.is_moe:
        raise ValueError("dense checkpoint has is_moe=True already; continuation starts from a dense model")
    if math.isqrt(num_experts) ** 2 != num_experts:
        raise ValueError(f"num_experts={num_experts} must be a perfect square (product keys: num_keys² experts, "
                         f"e.g. 1024 or 16384); the experts past floor(sqrt)² would never be routed to")
    return dense.replace(is_moe=True, num_experts=num_experts, num_experts_per_tok=top_k, **changes)


def moe_params_from_dense(dense_params: dict, moe_cfg: DogeConfig, *, seed: int = 0,
                          zero_up_embed: bool = False) -> dict:
    """Dense parameter tree → MoE parameter tree (nested dicts of float32 numpy arrays, `params_of` layout)."""
    expected = _flatten(ckpt.params_of(model_lib.abstract_model(moe_cfg)))
    dense = _flatten(dense_params)
    std = moe_cfg.initializer_range
    out = {}
    for path, ref in expected.items():
        if path in dense:
            value = np.asarray(dense[path], np.float32)
            if value.shape != tuple(ref.shape):
                raise ValueError(f"dense parameter {'.'.join(map(str, path))} has shape {value.shape}, the MoE "
                                 f"config implies {tuple(ref.shape)}")
            out[path] = value
            continue
        if path[0] != "layers" or path[2] != "mlp" or path[3:] not in NEW_MOE_PARAMS:
            raise ValueError(f"MoE parameter {'.'.join(map(str, path))} has no dense counterpart and is not a "
                             f"router/expert table: is the dense checkpoint the same architecture?")
        if path[3:] == ("up_embed",) and zero_up_embed:
            out[path] = np.zeros(ref.shape, np.float32)
            continue
        # One key per (layer, parameter): the tables do not depend on which other parameters exist.
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), int(path[1])),
                                 NEW_MOE_PARAMS.index(path[3:]))
        out[path] = np.asarray(std * jax.random.normal(key, ref.shape, jnp.float32))
    unused = sorted(".".join(map(str, p)) for p in set(dense) - set(expected))
    if unused:
        raise ValueError(f"dense parameter(s) {unused[:5]} have no place in the MoE model")
    return _unflatten(out)


def continue_from_dense(dense: str, out: str, *, num_experts: int, top_k: int, seed: int = 0,
                        zero_up_embed: bool = False, step: int | None = None, overwrite: bool = False,
                        **config_changes) -> str:
    """Reads the dense checkpoint at `dense` (workdir, checkpoints/ or step folder), writes the MoE checkpoint
    to workdir `out` (checkpoints/0/{params, model_config} and tokenizer/). Returns the absolute `out`."""
    ref = ckpt.resolve(dense, step)
    dense_cfg = ckpt.load_config(ref)
    moe_cfg = moe_config_from_dense(dense_cfg, num_experts=num_experts, top_k=top_k, **config_changes)
    dense_params = ckpt.load_params(ref, ckpt.params_of(model_lib.abstract_model(dense_cfg)))
    params = moe_params_from_dense(dense_params, moe_cfg, seed=seed, zero_up_embed=zero_up_embed)
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise FileExistsError(f"out={out!r} already exists and is not empty (pass --overwrite to replace it)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:  # write beside `out`, then rename: nothing half-written on failure
        ckpt.save_params(tmp, 0, params, moe_cfg)
        if ref.tokenizer_dir is not None:
            shutil.copytree(ref.tokenizer_dir, os.path.join(tmp, ckpt.TOKENIZER))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree
