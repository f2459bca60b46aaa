"""Global batches from data shards: each process reads only the shards its devices hold.

The data is split into K shards (`config.data_shards`; 0 = one per process). A step's global batch has
A micro-batches of M rows, laid out [A, M, ...] and sharded over the mesh's batch axes along M. Shard k
supplies rows [k·M/K, (k+1)·M/K) of every micro-batch, so the global batch — and therefore the loss — does
not depend on how many processes read it: a 2-host run with K = 2 sees exactly the batches of a 1-host run
with K = 2. A process reads shard k iff one of its devices holds one of those rows. Each shard's iterator yields
the A·M/K rows of a whole step, whatever A is: the split into micro-batches only regroups them (`resplit`), so a
run resumed with another A reads the same rows at every step.

A batch source is `make(split, shard_index, shard_count, rows, num_batches) -> iterator` of dicts of numpy
arrays [rows, ...]; the iterator's get_state()/set_state() make resume exact.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from doge_jax.parallel import sharding as sh

BatchSource = Callable[..., Iterator[dict]]


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
    """[A, M, ...] arrays: micro-batches replicated-in-sequence, rows over the batch axes, the rest whole."""
    return NamedSharding(mesh, sh.logical_to_spec((None, sh.BATCH)))


def shard_owners(sharding: NamedSharding, rows: int, num_shards: int) -> dict[int, list[int]]:
    """{process index: the shards it must read}, from which rows of M its devices hold."""
    per_shard = rows // num_shards
    owners: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((1, rows)).items():
        start, stop, _ = index[1].indices(rows)
        shards = range(start // per_shard, (stop - 1) // per_shard + 1)
        owners.setdefault(device.process_index, set()).update(shards)
    return {p: sorted(s) for p, s in owners.items()}


class ShardedBatches:
    """Iterates global [A, M, ...] batches for one split; `state()` / `set_state()` for checkpoints."""

    def __init__(self, source: BatchSource, *, mesh: Mesh, split: str, num_micro: int, rows: int,
                 num_shards: int, num_batches: int | None = None):
        self.sharding = microbatch_sharding(mesh)
        self.num_micro, self.rows, self.num_shards = num_micro, rows, num_shards
        self.per_shard = rows // num_shards
        owners = shard_owners(self.sharding, rows, num_shards)
        self.my_shards = owners.get(jax.process_index(), [])
        # The lowest process reading a shard is the one whose iterator state the checkpoint keeps.
        self.writer = {k: min(p for p, ks in owners.items() if k in ks) for k in range(num_shards)}
        self._owners = owners
        self.iterators = {k: source(split=split, shard_index=k, shard_count=num_shards,
                                    rows=num_micro * self.per_shard, num_batches=num_batches)
                          for k in self.my_shards}
        self._peeked: dict | None = None  # the next step's rows, read by peek_spec() and not yet returned

    def __iter__(self):
        return self

    def peek_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{name: (shape after the row axis, dtype)} of the next batch, which a later next() still returns."""
        if self._peeked is None:
            self._peeked = {k: next(it) for k, it in self.iterators.items()}
        sample = next(iter(self._peeked.values()))
        return {name: (tuple(np.shape(x)[1:]), np.asarray(x).dtype) for name, x in sample.items()}

    def resplit(self, num_micro: int) -> None:
        """The same rows per step in num_micro micro-batches (the iterators are untouched)."""
        total = self.num_micro * self.rows
        rows = total // num_micro
        if num_micro * rows != total or rows % self.num_shards \
                or shard_owners(self.sharding, rows, self.num_shards) != self._owners:
            raise ValueError(f"cannot split {total} rows into {num_micro} micro-batches over {self.num_shards} "
                             "data shards and this mesh")
        self.num_micro, self.rows, self.per_shard = num_micro, rows, rows // self.num_shards

    def __next__(self) -> dict[str, jax.Array]:
        pulled, self._peeked = self._peeked, None
        if pulled is None:
            pulled = {k: next(it) for k, it in self.iterators.items()}
        local = {}
        for k, batch in pulled.items():
            local[k] = {name: np.asarray(x).reshape((self.num_micro, self.per_shard) + np.shape(x)[1:])
                        for name, x in batch.items()}
        names = next(iter(local.values())).keys()
        return {name: self._global({k: b[name] for k, b in local.items()}) for name in names}

    def _global(self, pieces: dict[int, np.ndarray]) -> jax.Array:
        """Shard pieces [A, M/K, ...] → one global [A, M, ...] array on the mesh."""
        sample = next(iter(pieces.values()))
        shape = (self.num_micro, self.rows) + sample.shape[2:]

        def rows_of(index):
            start, stop, _ = index[1].indices(self.rows)
            parts = []
            for k in range(start // self.per_shard, (stop - 1) // self.per_shard + 1):
                lo = max(start, k * self.per_shard) - k * self.per_shard
                hi = min(stop, (k + 1) * self.per_shard) - k * self.per_shard
                parts.append(pieces[k][:, lo:hi])
            block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
            return block[(index[0],) + (slice(None),) + tuple(index[2:])]

        return jax.make_array_from_callback(shape, self.sharding, rows_of)

    def state(self) -> dict[str, Any]:
        """The states of the shards this process is the writer of (merge across processes for a checkpoint)."""
        return {str(k): it.get_state() for k, it in self.iterators.items()
                if self.writer[k] == jax.process_index() and hasattr(it, "get_state")}

    def set_state(self, states: dict[str, Any]) -> None:
        for k, it in self.iterators.items():
            if str(k) not in states:
                raise ValueError(f"the checkpoint holds no data state for shard {k} of {self.num_shards}")
            it.set_state(states[str(k)])
