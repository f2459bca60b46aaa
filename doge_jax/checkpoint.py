"""Orbax checkpoints: one layout shared by training, the converter and `load_model`.

    WORKDIR/
      checkpoints/<step>/params/        model parameters (the NNX Param state as a nested dict), float32
      checkpoints/<step>/model_config/  the DogeConfig as JSON
      checkpoints/<step>/...            trainer items (optimizer state, RNG, data iterator) when training wrote it
      tokenizer/                        HF tokenizer files (AutoTokenizer.from_pretrained loads this folder)

Orbax writes each step into a temporary folder and renames it when complete, so a crash or `kill -9` at any
moment leaves the previous complete step usable (on gs://, where there is no rename, a step counts once Orbax
has written its commit marker). `resolve()` accepts a WORKDIR, its `checkpoints/` folder or one step's folder,
local or gs:// (doge_jax.storage).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from doge_jax import storage
from doge_jax.model.config import DogeConfig

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    root: str  # the folder holding <step>/ folders (a local path or a gs:// URL)
    step: int

    @property
    def workdir(self) -> str:
        root = storage.path(self.root)
        return str(root.parent) if root.name == CHECKPOINTS else self.root

    @property
    def tokenizer_dir(self) -> str | None:
        path = storage.path(self.workdir) / TOKENIZER
        return str(path) if path.is_dir() else None


def is_complete_step(step_dir) -> bool:
    """A step folder Orbax finished: its params item, and on gs:// the commit marker written last."""
    step_dir = storage.path(step_dir)
    return (step_dir / "params").is_dir() and ocp.utils.is_checkpoint_finalized(step_dir)


def steps(root) -> list[int]:
    """The complete steps under a checkpoints/ folder, ascending."""
    root = storage.path(root)
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir() if re.fullmatch(r"\d+", d.name) and is_complete_step(d))


def resolve(path: str, step: int | None = None, *, field: str = "checkpoint") -> CheckpointRef:
    """A WORKDIR (latest step), WORKDIR/checkpoints, or WORKDIR/checkpoints/<step> → CheckpointRef."""
    p = storage.path(path, field=field)
    storage.check_reachable(p, field=field)
    path = str(p)
    if not p.exists():
        raise FileNotFoundError(f"{field}={path!r} does not exist")
    if re.fullmatch(r"\d+", p.name) and (p / "params").is_dir():
        if step is not None and step != int(p.name):
            raise ValueError(f"step={step} conflicts with the step folder {field}={path!r}")
        return CheckpointRef(str(p.parent), int(p.name))
    for root in (str(p / CHECKPOINTS), path):
        steps_here = steps(root)
        if steps_here:
            if step is None:
                return CheckpointRef(root, steps_here[-1])
            if step not in steps_here:
                raise ValueError(f"step={step} not in {field}={path!r} (has {steps_here})")
            return CheckpointRef(root, step)
    raise FileNotFoundError(f"{field}={path!r} holds no complete checkpoint "
                            f"(expected {CHECKPOINTS}/<step>/params or <step>/params)")


def manager(root: str, *, max_to_keep: int | None = None, async_save: bool = False,
            save_interval_steps: int = 1) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           save_interval_steps=save_interval_steps, create=True)
    return ocp.CheckpointManager(storage.path(root), options=options)  # gs:// stays a URL: Orbax writes it


def params_of(model: nnx.Module) -> dict:
    """The model's parameters as a nested dict of arrays (the `params` item)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_params(workdir: str, step: int, params: dict, cfg: DogeConfig) -> None:
    """Writes a parameter-only checkpoint (what the converter produces; training can start from it)."""
    mngr = manager(storage.join(workdir, CHECKPOINTS))
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
