"""Training checkpoints: everything needed to continue a run exactly, in doge_jax.checkpoint's layout.

    WORKDIR/checkpoints/<step>/
      params/        the model (what the converter and `load_model` read)
      model_config/  the DogeConfig as JSON
      opt_state/     optax AdamW state, sharded like the params
      train_state/   JSON: step, the run's RNG key, the data iterators' states (one per data shard)

Orbax writes a step into a temporary folder and renames it when every item is complete, so `kill -9` at any
moment leaves the last complete step usable. Restoring takes the target shardings from the *current* mesh, so
a run can continue on a different mesh or number of hosts.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from doge_jax import checkpoint as ckpt, storage
from doge_jax.model.config import DogeConfig

TRAIN_ITEMS = ("params", "opt_state", "train_state")


class Checkpointer:
    """Saves and restores the train state of one workdir (async saves, keep-last-K)."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool):
        self.root = checkpoints_root(workdir)
        self.mngr = ckpt.manager(self.root, max_to_keep=keep if keep > 0 else None, async_save=async_save)

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state: dict, model_cfg: DogeConfig, train_meta: dict) -> None:
        """Starts writing `step` (returns once arrays are copied off the devices when async)."""
        self.mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            model_config=ocp.args.JsonSave(model_cfg.to_dict()),
            train_state=ocp.args.JsonSave(train_meta)), force=True)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def checkpoints_root(workdir: str) -> str:
    """WORKDIR/checkpoints, a local path or a gs:// URL."""
    return storage.join(str(storage.path(workdir, field="--workdir")), ckpt.CHECKPOINTS)


def latest_step(workdir: str) -> int | None:
    """The last complete step in WORKDIR, read without creating anything (a bad run writes nothing)."""
    found = ckpt.steps(checkpoints_root(workdir))
    return found[-1] if found else None


def is_train_checkpoint(ref: ckpt.CheckpointRef) -> bool:
    """A full training checkpoint (vs a params-only one, e.g. from `convert from-hf`)."""
    step_dir = storage.path(ref.root) / str(ref.step)
    return all((step_dir / item).is_dir() for item in TRAIN_ITEMS)


def restore(ref: ckpt.CheckpointRef, target: dict) -> tuple[dict, dict]:
    """(params, opt_state) shaped and placed like `target`'s ShapeDtypeStructs (shardings of the current
    mesh), and the train_state JSON."""
    mngr = ckpt.manager(ref.root)
    try:
        out = mngr.restore(ref.step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target["params"]),
            opt_state=ocp.args.StandardRestore(target["opt_state"]),
            train_state=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return {"params": out["params"], "opt_state": out["opt_state"]}, out["train_state"]


def read_train_state(ref: ckpt.CheckpointRef) -> dict:
    """The train_state JSON of a training checkpoint (step, RNG, data shards and their states)."""
    mngr = ckpt.manager(ref.root)
    try:
        return mngr.restore(ref.step, args=ocp.args.Composite(train_state=ocp.args.JsonRestore()))["train_state"]
    finally:
        mngr.close()


def gather_json(obj: Any) -> list[Any]:
    """Every process's `obj` (JSON-serialisable), in process order: how the data states of all hosts reach
    the checkpoint's one JSON item (only the primary host writes JSON)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    everyone = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(bytes(everyone[i, : lengths[i]])) for i in range(len(lengths))]
