"""Post-training records: where they come from, the train/eval split, and a resumable batch iterator.

`posttrain.dataset` names the records: 'builtin:NAME' (datasets.py), a .jsonl / .parquet file or glob, or a
folder saved with `datasets.Dataset.save_to_disk` (HF datasets on disk; `posttrain.hf_split` picks a split of a
DatasetDict). Several specs may be joined with commas. Each record is a dict; the stage decides which keys it
reads (sft.py, dpo.py, grpo.py).

Batches follow the trainer's batch-source contract (doge_jax/trainer/batches.py): `make(split, shard_index,
shard_count, rows, num_batches)` returns an iterator of dicts of numpy arrays [rows, ...] with get_state() /
set_state(). Shard k reads every shard_count-th record of the split; each epoch is a fresh permutation of
them (seeded), so the state is just (epoch, position).
"""

from __future__ import annotations

from doge_jax.errors import ConfigError

import glob
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from doge_jax.posttrain import datasets


def load_records(spec: str, *, hf_split: str = "train", field: str = "posttrain.dataset") -> list[dict]:
    if not spec:
        raise ConfigError(f"config.{field} is empty: name 'builtin:NAME', a .jsonl/.parquet file or a saved HF dataset dir")
    records: list[dict] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part.startswith("builtin:"):
            try:
                records += datasets.builtin(part[len("builtin:"):])
            except ValueError as e:
                raise ConfigError(f"config.{field}={spec!r}: {e}") from None
            continue
        path = os.path.expanduser(part)
        if os.path.isdir(path):
            records += _hf_disk(path, hf_split, field)
            continue
        paths = sorted(glob.glob(path))
        if not paths:
            raise ConfigError(f"config.{field}={part!r} matched no files (builtin names: "
                             f"{['builtin:' + n for n in sorted(datasets.BUILTIN)]})")
        for p in paths:
            records += _file(p, field)
    if not records:
        raise ConfigError(f"config.{field}={spec!r} holds no records")
    return records


def _file(path: str, field: str) -> list[dict]:
    if path.endswith(".jsonl") or path.endswith(".json"):
        out = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"config.{field}: {path}:{n} is not valid JSON ({e})") from None
        return out
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ConfigError(f"config.{field}: {path} must end in .jsonl, .json or .parquet (or be a saved HF dataset dir)")


def _hf_disk(path: str, split: str, field: str) -> list[dict]:
    import datasets as hf_datasets

    try:
        ds = hf_datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise ConfigError(f"config.{field}={path!r} is not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, hf_datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"config.posttrain.hf_split={split!r} is not a split of {path} (has {list(ds)})")
        ds = ds[split]
    return ds.to_list()


def split_indices(num: int, eval_fraction: float, split: str) -> np.ndarray:
    """A fixed pseudo-random eval subset (the same for every run, seed and process count); at least one record
    each side when eval_fraction > 0."""
    if split not in ("train", "eval"):
        raise ValueError(f"{split=} must be 'train' or 'eval'")
    order = np.random.default_rng(20261128).permutation(num)
    n_eval = 0 if eval_fraction <= 0 else min(max(1, round(eval_fraction * num)), num - 1)
    chosen = order[:n_eval] if split == "eval" else order[n_eval:]
    return np.sort(chosen)


class IndexStream:
    """This shard's records in a per-epoch shuffled order; `peek` / `advance` let a batch take a variable count."""

    def __init__(self, indices: np.ndarray, *, seed: int, shuffle: bool):
        if len(indices) == 0:
            raise ValueError("a data shard has no records: fewer records than data shards, or eval_fraction = 0")
        self.indices, self.seed, self.shuffle = np.asarray(indices), seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, None

    def _current(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.indices)
                           if self.shuffle else self.indices)
            self._order_epoch = self.epoch
        return self._order

    def peek(self) -> int:
        return int(self._current()[self.pos])

    def advance(self) -> None:
        self.pos += 1
        if self.pos == len(self.indices):
            self.epoch, self.pos = self.epoch + 1, 0

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class Batches:
    """Iterator of `assemble(stream, rows)` batches; stops after num_batches when given (eval)."""

    def __init__(self, stream: IndexStream, assemble: Callable[[IndexStream, int], dict], rows: int,
                 num_batches: int | None = None):
        self.stream, self.assemble, self.rows, self.num_batches = stream, assemble, rows, num_batches
        self.produced = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.num_batches is not None and self.produced >= self.num_batches:
            raise StopIteration
        self.produced += 1
        return self.assemble(self.stream, self.rows)

    def get_state(self) -> dict:
        return {**self.stream.get_state(), "produced": self.produced}

    def set_state(self, state: dict) -> None:
        self.stream.set_state(state)
        self.produced = int(state.get("produced", 0))


def make_source(num_records: int, assemble: Callable[[IndexStream, int], dict], *, eval_fraction: float,
                seed: int, shuffle: bool = True):
    """The trainer's batch-source callable over records [0, num_records)."""

    def make(*, split: str, shard_index: int, shard_count: int, rows: int, num_batches: int | None = None):
        indices = split_indices(num_records, eval_fraction, split)[shard_index::shard_count]
        stream = IndexStream(indices, seed=seed * 1000 + shard_index, shuffle=shuffle and split == "train")
        return Batches(stream, assemble, rows, num_batches)

    return make


def as_messages(value, role: str, where: str) -> list[dict]:
    """A string, one message dict or a list of messages → a list of messages (strings get `role`)."""
    from doge_jax.posttrain.chat import check_messages

    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, Sequence):
        return check_messages(list(value), where)
    raise ValueError(f"{where}: expected a string or messages, got {type(value).__name__}")
