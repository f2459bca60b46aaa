"""The DPO / GRPO reference is an argument of the jitted train step, not constants baked into it.

The Trainer's train step is lowered (not run) for the stage configs at two model sizes; the bytes of the
non-splat constants in the StableHLO must stay the same (the reference's weights, 1–3 MB here, would show up
as `stablehlo.constant dense<"0x…">` if the loss closed over them), and the reference's parameters must be
placed exactly like the policy's.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import doge_jax
from doge_jax import checkpoint as ckpt
from doge_jax.posttrain import trainer_kwargs
from doge_jax.trainer import Trainer

_CONSTANT = re.compile(r'stablehlo\.constant dense<(["\[])[^\n]*: tensor<([0-9x]*)([a-z]+[0-9]*)>')
_BYTES = {"f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2, "i64": 8, "f64": 8, "i8": 1, "ui8": 1, "i1": 1}


def constant_bytes(hlo: str) -> int:
    """Bytes of the non-splat constants (`dense<"0x…">` / `dense<[…]>`) of a StableHLO module."""
    total = 0
    for _, dims, dtype in _CONSTANT.findall(hlo):
        total += int(np.prod([int(d) for d in dims.split("x") if d] or [1])) * _BYTES[dtype]
    return total


def test_constant_bytes_counts_captured_arrays():
    w = jnp.asarray(np.random.default_rng(0).random((128, 64), np.float32))
    hlo = jax.jit(lambda x: x @ w).lower(jax.ShapeDtypeStruct((2, 128), jnp.float32)).as_text()
    assert constant_bytes(hlo) == 128 * 64 * 4
    assert constant_bytes(jax.jit(lambda x, w: x @ w).lower(jnp.zeros((2, 128)), w).as_text()) == 0


def _stage_trainer(stage: str, tmp_path, hidden: int) -> Trainer:
    import importlib

    config = importlib.import_module(f"configs.tiny_{stage}").get_config()
    config.model.hidden_size = hidden
    config.model.intermediate_size = 2 * hidden
    cfg = doge_jax.DogeConfig.from_dict(config.model.to_dict())
    init = str(tmp_path / f"init_{stage}_{hidden}")
    ckpt.save_params(init, 0, ckpt.params_of(doge_jax.build(cfg, seed=1)), cfg)
    config.init_from = init
    return Trainer(config, str(tmp_path / f"run_{stage}_{hidden}"), **trainer_kwargs(config))


def _batch(stage: str, config) -> dict:
    A = 1 if config.grad_accum_steps == "auto" else config.grad_accum_steps  # "auto": the run resolves it
    M = config.batch_size // A
    i32 = lambda *shape: jax.ShapeDtypeStruct((A, M) + shape, jnp.int32)  # noqa: E731
    if stage == "dpo":
        return {k: i32(2, config.seq_len) for k in ("input_ids", "targets", "segment_ids", "positions")}
    P = config.grpo.max_prompt_len
    return {"prompt_ids": i32(P), "prompt_mask": i32(P), "index": i32()}


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_reference_is_a_step_argument(stage, tmp_path):
    sizes = {}
    for hidden in (32, 96):  # the reference's weights: 8192-token embedding × hidden ≈ 1 MB and 3 MB
        trainer = _stage_trainer(stage, tmp_path, hidden)
        hlo = trainer.lower_train_step(_batch(stage, trainer.config)).as_text()
        sizes[hidden] = constant_bytes(hlo)
        assert trainer.frozen_sharding["reference"] == trainer.param_sharding  # placed by the policy's rules
        ref_leaves = jax.tree.leaves(trainer.frozen_abstract["reference"])
        assert sum(x.size for x in ref_leaves) == sum(x.size for x in jax.tree.leaves(trainer.abstract_params))

    assert sizes[32] == sizes[96], sizes  # constants do not grow with the model
    assert sizes[96] < 64 * 1024, sizes  # and are small: no weights among them
