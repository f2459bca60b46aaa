"""`data.source='hf'`: documents streamed by `datasets.load_dataset(..., streaming=True)`, resumable exactly.

    load_dataset(hf_name, hf_config or None, split=hf_split, data_files=<data.path files>, streaming=True)

`hf_name` is a Hub id (`HuggingFaceTB/smollm-corpus` with hf_config `fineweb-edu-dedup`) or a builder for
local / gs:// files (`json`, `parquet`, `text`, or a local dataset folder) with `data.path` as its data_files:
the same code path either way.

A stream cannot seek, so exact resume is "count and skip", done in two layers:
  * datasets' own `IterableDataset.state_dict()`: which file (shard) the stream is in and how many examples of
    it were read; `load_state_dict` skips whole files and reads past that many examples of the current one.
    So a resume re-reads at most one file of the source, never the stream from its start.
  * a window shuffle on top: W = data.shuffle_window documents are read, permuted by (seed, epoch, window
    index) and emitted. The checkpoint keeps datasets' state at the window's *start* and the position inside
    it; a resume reloads that state, re-reads the W documents and skips the emitted ones. datasets' own
    shuffle buffer is not used: its contents are not in its state_dict, so it would not resume exactly.
Pretokenizing (`python -m doge_jax.data.pretokenize`) instead gives random access (and no tokenizing on the
hosts); the stream is for starting from a Hub dataset without a preprocessing pass.

Each data shard k of K reads `split_dataset_by_node(rank=k, world_size=K)`: whole files when K divides the
file count, else every K-th example. The held-out split is by a hash of the document text (a stream has no
stable global index): the same documents are held out whatever the shard count or seed.
"""

from __future__ import annotations

import copy
import hashlib

import grain
import numpy as np

from doge_jax import storage
from doge_jax.errors import ConfigError

_LOCAL_BUILDERS = ("json", "parquet", "text", "csv", "arrow")


def held_out(text: str, eval_fraction: float) -> bool:
    """Whether a document is in the eval split: a 64-bit hash of its text, uniform in [0, 1), < fraction."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < eval_fraction


def _data_files(cfg, field: str):
    if not cfg.path:
        return None
    specs = [s.strip() for s in cfg.path.split(",") if s.strip()]
    if cfg.hf_name not in _LOCAL_BUILDERS:
        return specs  # paths inside a Hub repo: datasets resolves them
    files = []
    for spec in specs:
        matched = storage.glob(spec, field=f"{field}.path")
        if not matched:
            raise ConfigError(f"{field}.path={spec!r} matched no files")
        files.extend(matched)
    return files


def open_stream(cfg, *, shard_index: int, shard_count: int, field: str = "config.data"):
    """The `datasets.IterableDataset` this shard reads; checks that `text_field` is there (reads one row)."""
    try:
        import datasets  # pylint: disable=g-import-not-at-top  (optional dependency)
        from datasets.distributed import split_dataset_by_node  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ConfigError(f"{field}.source='hf' needs datasets: pip install datasets ({e})") from None
    if not cfg.hf_name:
        raise ConfigError(f"{field}.hf_name='' must name a Hub dataset or a builder ({', '.join(_LOCAL_BUILDERS)}) "
                          f"when {field}.source='hf'")
    if cfg.hf_name in _LOCAL_BUILDERS and not cfg.path:
        raise ConfigError(f"{field}.path='' must name the files for {field}.hf_name={cfg.hf_name!r}")
    data_files = _data_files(cfg, field)
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=cfg.hf_split, data_files=data_files,
                                   streaming=True)
    except Exception as e:  # pylint: disable=broad-except  (datasets raises many types for "cannot open")
        raise ConfigError(f"{field}.hf_name={cfg.hf_name!r} (hf_config={cfg.hf_config!r}, hf_split={cfg.hf_split!r}) "
                          f"could not be opened: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    try:
        first = next(iter(ds))
    except StopIteration:
        raise ConfigError(f"{field}.hf_name={cfg.hf_name!r}: the split {cfg.hf_split!r} holds no rows") from None
    if cfg.text_field not in first:
        raise ConfigError(f"{field}.text_field={cfg.text_field!r} absent in {field}.hf_name={cfg.hf_name!r} "
                          f"(columns: {sorted(first)})")
    if shard_count > 1:
        ds = split_dataset_by_node(ds, rank=shard_index, world_size=shard_count)
    return ds


class _StreamIterator(grain.DatasetIterator):
    """Documents (str) of one shard and split, window-shuffled; get_state()/set_state() resume exactly."""

    def __init__(self, cfg, *, split: str, shard_index: int, shard_count: int, seed: int,
                 num_epochs: int | None, field: str):
        super().__init__()
        self._cfg, self._split, self._seed, self._num_epochs = cfg, split, seed, num_epochs
        self._ds = open_stream(cfg, shard_index=shard_index, shard_count=shard_count, field=field)
        self._window_size = max(int(cfg.shuffle_window), 1) if (cfg.shuffle and split == "train") else 1
        self._epoch, self._window_index, self._pos = 0, 0, 0
        self._window: list[str] = []
        self._initial_state = copy.deepcopy(self._ds.state_dict())  # the stream's start (epochs restart here)
        self._window_start = copy.deepcopy(self._initial_state)
        self._rows = None  # the iterator over self._ds that reads the current window
        self._next_start = None

    def _documents(self):
        for row in self._rows:
            text = row[self._cfg.text_field]
            if not isinstance(text, str) or not text:
                continue
            if held_out(text, self._cfg.eval_fraction) == (self._split == "eval"):
                yield text

    def _fill(self) -> bool:
        """Reads the next window from the stream position self._window_start; False at the end of the data."""
        while True:
            self._ds.load_state_dict(copy.deepcopy(self._window_start))
            self._rows = iter(self._ds)
            docs = self._documents()
            self._window = [d for _, d in zip(range(self._window_size), docs)]
            self._next_start = copy.deepcopy(self._ds.state_dict())  # where the reads of this window ended
            docs.close()
            self._rows.close()  # each window reopens from its saved state: no reader is left open
            if self._window:
                if self._window_size > 1:
                    rng = np.random.default_rng([self._seed, self._epoch, self._window_index])
                    self._window = [self._window[i] for i in rng.permutation(len(self._window))]
                return True
            self._epoch += 1  # the stream ran out: another epoch from its start, or the end
            self._window_index = 0
            if self._num_epochs is not None and self._epoch >= self._num_epochs:
                return False
            self._window_start = copy.deepcopy(self._initial_state)

    def __next__(self) -> str:
        if not self._window and not self._fill():
            raise StopIteration
        doc = self._window[self._pos]
        self._pos += 1
        if self._pos == len(self._window):  # the next window starts where this one's reads ended
            self._window_start = self._next_start
            self._window, self._pos = [], 0
            self._window_index += 1
        return doc

    def get_state(self):
        return {"epoch": self._epoch, "window": self._window_index, "pos": self._pos,
                "start": copy.deepcopy(self._window_start)}

    def set_state(self, state):
        self._epoch, self._window_index = int(state["epoch"]), int(state["window"])
        self._window_start = copy.deepcopy(state["start"])
        self._window, self._pos = [], 0
        if state["pos"]:
            if not self._fill():
                raise ValueError("the data stream is shorter than the checkpoint says it was")
            self._pos = int(state["pos"])


class StreamDataset(grain.IterDataset):
    """A grain IterDataset over `_StreamIterator` (so grain's mix, packing and state handling apply)."""

    def __init__(self, cfg, *, split: str, shard_index: int, shard_count: int, seed: int,
                 num_epochs: int | None, field: str = "config.data"):
        super().__init__()
        self._kwargs = dict(split=split, shard_index=shard_index, shard_count=shard_count, seed=seed,
                            num_epochs=num_epochs, field=field)
        self._cfg = cfg
        self._first = _StreamIterator(cfg, **self._kwargs)  # opens the stream now: bad config fails here

    def __iter__(self) -> _StreamIterator:
        first, self._first = self._first, None
        return first if first is not None else _StreamIterator(self._cfg, **self._kwargs)
