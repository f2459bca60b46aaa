"""Document sources: random-access sequences of documents, one class per `data.source`.

Every source is a `Sequence` (`len` and `[i]`) so grain can shuffle, split and shard it by index without
reading anything it does not need. A document is a `str`, except for 'arrayrecord' (pretokenized shards),
where it is a 1-D array of token ids. Sources hold no open file handles across pickling, so grain worker
processes can take them.

  default     Python's own documentation (see `_corpus.py`), in memory (~2 MB).
  text        .txt files; `text_unit` picks a document = a file (read lazily), a blank-line-separated
              paragraph, or a line.
  jsonl       one JSON object per line, `text_field` holds the document; lines are indexed by byte offset
              and parsed on access, so a large file is never held in memory.
  parquet     the `text_field` column of .parquet files (only that column is loaded, into memory).
  tfds        a prepared TFDS dataset read through `tfds.data_source` (ArrayRecord files, no TensorFlow).
  hf_disk     a HF `datasets` dataset saved with `save_to_disk` (memory-mapped Arrow).
  arrayrecord token-id shards written by `python -m doge_jax.data.pretokenize`.
  hf          datasets.load_dataset(..., streaming=True): not random access, see `_stream.py`.

Paths and globs may be gs:// URLs (doge_jax.storage): text and parquet are read through epath, jsonl files and
ArrayRecord shards are copied to a local cache first (`storage.local_copy`: jsonl is read by byte offset, one
small read per document, and ArrayRecord's C++ reader opens local files only).
"""

from __future__ import annotations

from doge_jax import storage
from doge_jax.errors import ConfigError

import json
import os
import threading
from collections.abc import Sequence

import numpy as np

SOURCES = ("default", "text", "jsonl", "parquet", "tfds", "hf_disk", "arrayrecord", "hf")
STREAMED = ("hf",)  # not random access: read by doge_jax.data._stream
TEXT_UNITS = ("file", "paragraph", "line")
PRETOKENIZED_METADATA = "metadata.json"


def expand_paths(path, *, field: str = "data.path", suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files matched by a path, glob, comma-separated string or list of them, each spec sorted.

    A directory means the files inside it (those ending in `suffixes`, when given).
    """
    specs = [s.strip() for s in path.split(",")] if isinstance(path, str) else list(path or [])
    if not specs or not all(isinstance(s, str) and s for s in specs):
        raise ConfigError(f"config.{field}={path!r} must be a file path, glob or list of them")
    files = []
    for spec in specs:
        storage.path(spec, field=f"config.{field}")  # an unsupported scheme is an error, not a local name
        matched = storage.glob(spec, field=f"config.{field}")
        if suffixes and not storage.has_glob(spec) and storage.path(spec).is_dir():  # a dir: its files of that kind
            matched = [p for p in matched if p.endswith(suffixes)]
        if not matched:
            raise ConfigError(f"config.{field}={spec!r} matched no files")
        files.extend(matched)
    return files


class _Concat(Sequence):
    """Several sequences read as one, in order."""

    def __init__(self, parts: Sequence[Sequence]):
        self._parts = [p for p in parts if len(p)]
        self._ends = np.cumsum([len(p) for p in self._parts], dtype=np.int64)

    def __len__(self):
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._ends[part - 1]) if part else 0
        return self._parts[part][i - start]


class _Files(Sequence):
    """One document per text file, read on access."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)

    def __len__(self):
        return len(self._paths)

    def __getitem__(self, i):
        with storage.open_file(self._paths[i]) as f:
            return f.read().decode("utf-8", errors="replace")


def _split_text(path: str, unit: str) -> list[str]:
    with storage.open_file(path) as f:
        text = f.read().decode("utf-8", errors="replace")
    if unit == "line":
        pieces = text.split("\n")
    else:
        pieces, current = [], []
        for line in text.split("\n"):
            if line.strip():
                current.append(line)
            elif current:
                pieces.append("\n".join(current))
                current = []
        if current:
            pieces.append("\n".join(current))
    return [p for p in pieces if p.strip()]


class _JsonlFile(Sequence):
    """The `text_field` of each non-blank line of a .jsonl file, parsed on access."""

    def __init__(self, path: str, text_field: str):
        self._name = path
        path = storage.local_copy(path)  # gs://: one download to the local cache, then local random access
        self._path, self._text_field = path, text_field
        self._fd = None  # an open descriptor, per process (dropped when pickled for grain workers)
        self._open_lock = threading.Lock()
        newlines, size = [], 0
        with open(path, "rb") as f:  # scan in chunks: only the line offsets are kept
            while chunk := f.read(1 << 26):
                newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + size)
                size += len(chunk)
        newlines = np.concatenate(newlines or [np.zeros(0, np.int64)]).astype(np.int64)
        starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
        ends = np.concatenate([newlines, [size]]).astype(np.int64)
        # Blank lines are not documents. A JSON object line is never this short, so only short lines are read.
        nonblank = (ends - starts) > 8
        with open(path, "rb") as f:
            for j in np.flatnonzero(~nonblank):
                f.seek(starts[j])
                nonblank[j] = bool(f.read(ends[j] - starts[j]).strip())
        self._starts, self._ends = starts[nonblank], ends[nonblank]
        if len(self):
            self[0]  # fail fast on the most common mistake, a wrong text_field

    def __len__(self):
        return len(self._starts)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_open_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _fd=None, _open_lock=threading.Lock())

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __getitem__(self, i):
        start, end = int(self._starts[i]), int(self._ends[i])
        if self._fd is None:  # one descriptor per process, not an open() per document
            with self._open_lock:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDONLY)
        # pread, not seek + read: grain's prefetch threads call this concurrently, and a shared file position
        # lets one thread's seek land between another's seek and read (a line read from the wrong offset).
        line = os.pread(self._fd, end - start, start)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config.data.path={self._name!r} line {self._line_number(i)} is not JSON: {e}") from None
        if not isinstance(row, dict) or self._text_field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(
                f"config.data.text_field={self._text_field!r} absent in {self._name} line "
                f"{self._line_number(i)} (keys: {keys})"
            )
        text = row[self._text_field]
        if not isinstance(text, str):
            raise ConfigError(
                f"config.data.text_field={self._text_field!r} in {self._name} line {self._line_number(i)} "
                f"is a {type(text).__name__}, not a string"
            )
        return text

    def _line_number(self, i) -> int:
        with open(self._path, "rb") as f:
            return f.read(int(self._starts[i])).count(b"\n") + 1


def _parquet_texts(path: str, text_field: str) -> list[str]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (optional dependency)

    with storage.open_file(path) as f:
        names = pq.ParquetFile(f).schema_arrow.names
        if text_field not in names:
            raise ConfigError(f"config.data.text_field={text_field!r} absent in {path} (columns: {names})")
        f.seek(0)
        column = pq.read_table(f, columns=[text_field]).column(text_field)
    return [t for t in column.to_pylist() if t]


def documents_of_file(path: str, *, text_field: str = "text", text_unit: str = "file") -> Sequence:
    """The documents of one local file, by extension: .jsonl/.json, .parquet, else plain text."""
    if path.endswith((".jsonl", ".json")):
        return _JsonlFile(path, text_field)
    if path.endswith(".parquet"):
        return _parquet_texts(path, text_field)
    return _Files([path]) if text_unit == "file" else _split_text(path, text_unit)


class _TfdsTexts(Sequence):
    """The `text_field` of a TFDS data source, decoded to str."""

    def __init__(self, name: str, split: str, data_dir: str | None, text_field: str):
        try:
            import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (optional dependency)
        except ImportError as e:
            raise ConfigError(
                f"config.data.source='tfds' needs tensorflow-datasets: pip install tensorflow-datasets ({e})"
            ) from None
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # pylint: disable=broad-except  (tfds raises many types for "not there")
            raise ConfigError(
                f"config.data.tfds_name={name!r} split {split!r} could not be opened from "
                f"data.tfds_data_dir={data_dir!r}: {type(e).__name__}: {e}".replace("\n", " ")
            ) from None
        self._text_field = text_field
        features = getattr(getattr(self._source, "dataset_info", None), "features", None)
        if features is not None and hasattr(features, "keys") and text_field not in features.keys():
            raise ConfigError(
                f"config.data.text_field={text_field!r} absent in TFDS {name!r} (features: {sorted(features.keys())})"
            )

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        text = self._source[int(i)][self._text_field]
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


class _HfDiskTexts(Sequence):
    """The `text_field` column of a `datasets` dataset saved to disk."""

    def __init__(self, path: str, split: str, text_field: str):
        try:
            import datasets  # pylint: disable=g-import-not-at-top  (optional dependency)
        except ImportError as e:
            raise ConfigError(f"config.data.source='hf_disk' needs datasets: pip install datasets ({e})") from None
        if not os.path.isdir(path):
            raise ConfigError(f"config.data.path={path!r} is not a directory saved by datasets.save_to_disk")
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise ConfigError(f"config.data.path={path!r} is not a dataset saved by save_to_disk: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"config.data.hf_split={split!r} not in {path} (splits: {sorted(ds)})")
            ds = ds[split]
        if text_field not in ds.column_names:
            raise ConfigError(f"config.data.text_field={text_field!r} absent in {path} (columns: {ds.column_names})")
        self._ds = ds.select_columns([text_field])
        self._text_field = text_field

    def __len__(self):
        return len(self._ds)

    def __getitem__(self, i):
        return self._ds[int(i)][self._text_field]


class _TokenShards(Sequence):
    """Token-id documents from ArrayRecord shards written by `pretokenize` (one record per document)."""

    def __init__(self, paths: Sequence[str]):
        from grain import sources  # pylint: disable=g-import-not-at-top

        metadata_path = storage.path(paths[0]).parent / PRETOKENIZED_METADATA
        if not metadata_path.is_file():
            raise ConfigError(
                f"config.data.path={paths[0]!r}: no {PRETOKENIZED_METADATA} beside it; arrayrecord shards "
                "must come from python -m doge_jax.data.pretokenize"
            )
        self.metadata = json.loads(metadata_path.read_text())
        self._dtype = np.dtype(self.metadata["dtype"])
        self._source = sources.ArrayRecordDataSource([storage.local_copy(p) for p in paths])

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        return np.frombuffer(self._source[int(i)], dtype=self._dtype)


def open_documents(cfg) -> Sequence:
    """The documents `cfg` (a data config) names, before any split; raises ValueError on bad config."""
    source = cfg.source
    if source not in SOURCES:
        raise ConfigError(f"config.data.source={source!r} is not one of {SOURCES}")
    if source == "default":
        from doge_jax.data._corpus import default_corpus  # pylint: disable=g-import-not-at-top

        return default_corpus()
    if source == "tfds":
        if not cfg.tfds_name:
            raise ConfigError("config.data.tfds_name='' must name a TFDS dataset when data.source='tfds'")
        return _TfdsTexts(cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir or None, cfg.text_field)
    if source == "hf_disk":
        path = cfg.path if isinstance(cfg.path, str) else ",".join(cfg.path)
        return _HfDiskTexts(os.path.expanduser(path), cfg.hf_split, cfg.text_field)
    if source == "arrayrecord":
        return _TokenShards(expand_paths(cfg.path, suffixes=(".array_record",)))
    if source in STREAMED:
        raise ConfigError(f"config.data.source={source!r} is a stream, not random access (see data/_stream.py)")
    if source == "text" and cfg.text_unit not in TEXT_UNITS:
        raise ConfigError(f"config.data.text_unit={cfg.text_unit!r} is not one of {TEXT_UNITS}")
    paths = expand_paths(cfg.path)
    if source == "text":
        if cfg.text_unit == "file":
            return _Files(paths)
        return _Concat([_split_text(p, cfg.text_unit) for p in paths])
    if source == "jsonl":
        return _Concat([_JsonlFile(p, cfg.text_field) for p in paths])
    return _Concat([_parquet_texts(p, cfg.text_field) for p in paths])
