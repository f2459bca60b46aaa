"""Orbax checkpoints: one layout shared by training, the converter and `load_model`.

    WORKDIR/
      checkpoints/<step>/params/        model parameters (the NNX Param state as a nested dict), float32
      checkpoints/<step>/model_config/  the DogeConfig as JSON
      checkpoints/<step>/...            trainer items (optimizer state, RNG, data iterator) when training wrote it
      tokenizer/                        HF tokenizer files (AutoTokenizer.from_pretrained loads this folder)

Orbax writes each step into a temporary folder and renames it when complete, so a crash or `kill -9` at any
moment leaves the previous complete step usable. `resolve()` accepts a WORKDIR, its `checkpoints/` folder or one
step's folder.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from doge_jax.model.config import DogeConfig

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    root: str  # the folder holding <step>/ folders
    step: int

    @property
    def workdir(self) -> str:
        parent = os.path.dirname(self.root)
        return parent if os.path.basename(self.root) == CHECKPOINTS else self.root

    @property
    def tokenizer_dir(self) -> str | None:
        path = os.path.join(self.workdir, TOKENIZER)
        return path if os.path.isdir(path) else None


def _steps(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if re.fullmatch(r"\d+", d)
                  and os.path.isdir(os.path.join(root, d, "params")))


def resolve(path: str, step: int | None = None) -> CheckpointRef:
    """A WORKDIR (latest step), WORKDIR/checkpoints, or WORKDIR/checkpoints/<step> → CheckpointRef."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint={path!r} does not exist")
    base = os.path.basename(path)
    if re.fullmatch(r"\d+", base) and os.path.isdir(os.path.join(path, "params")):
        if step is not None and step != int(base):
            raise ValueError(f"step={step} conflicts with the step folder checkpoint={path!r}")
        return CheckpointRef(os.path.dirname(path), int(base))
    for root in (os.path.join(path, CHECKPOINTS), path):
        steps = _steps(root)
        if steps:
            if step is None:
                return CheckpointRef(root, steps[-1])
            if step not in steps:
                raise ValueError(f"step={step} not in checkpoint={path!r} (has {steps})")
            return CheckpointRef(root, step)
    raise FileNotFoundError(f"checkpoint={path!r} holds no complete checkpoint "
                            f"(expected {CHECKPOINTS}/<step>/params or <step>/params)")


def manager(root: str, *, max_to_keep: int | None = None, async_save: bool = False,
            save_interval_steps: int = 1) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           save_interval_steps=save_interval_steps, create=True)
    return ocp.CheckpointManager(os.path.abspath(root), options=options)


def params_of(model: nnx.Module) -> dict:
    """The model's parameters as a nested dict of arrays (the `params` item)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_params(workdir: str, step: int, params: dict, cfg: DogeConfig) -> None:
    """Writes a parameter-only checkpoint (what the converter produces; training can start from it)."""
    mngr = manager(os.path.join(workdir, CHECKPOINTS))
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), model_config=ocp.args.JsonSave(cfg.to_dict())), force=True)
    mngr.wait_until_finished()
    mngr.close()


def load_config(ref: CheckpointRef) -> DogeConfig:
    mngr = manager(ref.root)
    try:
        d = mngr.restore(ref.step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))["model_config"]
    finally:
        mngr.close()
    return DogeConfig.from_dict(d)


def load_params(ref: CheckpointRef, abstract_params: Any, shardings: Any = None) -> dict:
    """Restores `params` shaped like `abstract_params` (optionally onto `shardings`, e.g. another mesh)."""
    if shardings is None:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params)
    else:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract_params, shardings)
    mngr = manager(ref.root)
    try:
        return mngr.restore(ref.step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    finally:
        mngr.close()


def load_model(path: str, *, step: int | None = None, **config_overrides) -> nnx.Module:
    """The NNX model stored at `path` (a workdir, its checkpoints/ folder or a step folder)."""
    from doge_jax.model import decoder as model_lib

    ref = resolve(path, step)
    cfg = load_config(ref)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    model = model_lib.abstract_model(cfg)
    params = load_params(ref, params_of(model))
    return with_params(model, params)


def with_params(abstract_model: nnx.Module, params: dict) -> nnx.Module:
    """Fills an abstract model (from `nnx.eval_shape`) with `params`; RNG state gets fresh concrete values."""
    graphdef, param_state, rest = nnx.split(abstract_model, nnx.Param, ...)
    nnx.replace_by_pure_dict(param_state, params)
    return nnx.merge(graphdef, param_state, jax.tree.map(placeholder, rest))


def placeholder(x):
    """A concrete stand-in for an abstract leaf: key(0) for PRNG keys, zeros otherwise (RNG counters)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        return np.zeros(x.shape, x.dtype)
    return x
