"""The grain pipeline: documents -> held-out split -> process shard -> shuffle -> tokens -> packed batches.

    source[i]                                   documents (str, or token ids when pretokenized)
      -> split_indices(...)                     train / eval by a hash of the document index
      -> [process_index::process_count]         each process reads only its own documents
      -> shuffle(seed) -> repeat(num_epochs)    a new permutation each epoch (grain mixes in the epoch)
      -> tokenize (+ bos/eos)                   {'input_ids': int32[L]}
      -> ConcatThenSplit(seq_len)               rows of seq_len tokens, documents split across rows
      -> batch(batch_size), pad the last one    only a finite (eval) stream ever pads
      -> targets                                next token of the same segment, else -100

A stream (`data.source='hf'`, `_stream.py`) replaces the first four steps with its own split, shard and window
shuffle. A mixture (`data.mixture`) builds that token stream per component and interleaves them with grain's
`IterDataset.mix` (a fixed, deterministic schedule by weight: component i's share of every window of examples
is its weight over the total), then packs the mixed documents as one stream.

Every stage is a grain dataset, so the iterator's `get_state()` is a small dict (indices and every component's
stream position, not data) and `set_state()` resumes with exactly the batches that would have come next.

Positions count from 0 at the start of each segment of a row; a document that continues into the next row
starts a new segment at position 0 there (and its last token in the earlier row has target -100), so attention
and RoPE never see across a row or a document boundary.
"""

from __future__ import annotations

from doge_jax.errors import ConfigError

import functools
from collections.abc import Sequence

import grain
import numpy as np

from doge_jax.data import _config
from doge_jax.data import _sources
from doge_jax.data import _stream
from doge_jax.model.loss import IGNORE_INDEX  # the one definition: targets the loss skips
_HASH_KEY = 0x9E3779B97F4A7C15  # fixed, so the held-out set does not move with the shuffle seed


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A stateless 64-bit mixer (SplitMix64's finaliser): index -> well-spread 64-bit hash."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(_HASH_KEY)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_indices(num_documents: int, eval_fraction: float, split: str) -> np.ndarray:
    """Indices of the documents in `split`, ascending. A document is held out iff hash(index) < fraction.

    Depends on nothing but the index and the fraction, so raw text and its pretokenized shards (one record
    per document, same order) hold out the same documents, whatever the seed or the number of processes.
    """
    dtype = np.uint32 if num_documents < 2**32 else np.int64  # halves the index memory of big corpora
    held_out = []
    for start in range(0, num_documents, 1 << 24):  # chunks bound the uint64 temporaries
        idx = np.arange(start, min(start + (1 << 24), num_documents), dtype=np.uint64)
        unit = (_splitmix64(idx) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1)
        keep = unit < eval_fraction if split == "eval" else unit >= eval_fraction
        held_out.append(idx[keep].astype(dtype))
    return np.concatenate(held_out) if held_out else np.zeros(0, dtype)


class _Take(Sequence):
    """`documents[indices[i]]`: a view that reads only the documents it is asked for."""

    def __init__(self, documents: Sequence, indices: np.ndarray):
        self._documents, self._indices = documents, indices

    def __len__(self):
        return len(self._indices)

    def __getitem__(self, i):
        return self._documents[int(self._indices[i])]


class _Tokenize:
    """document -> {'input_ids': int32[L]} with optional bos/eos; token-id documents pass through."""

    def __init__(self, tokenizer, *, add_bos: bool, add_eos: bool):
        self._backend = getattr(tokenizer, "backend_tokenizer", None)  # skips the per-call Python layers
        self._tokenizer = tokenizer
        self._bos = [tokenizer.bos_token_id] if add_bos else []
        self._eos = [tokenizer.eos_token_id] if add_eos else []

    def __call__(self, document):
        if isinstance(document, np.ndarray):
            body = document.astype(np.int32)
        elif self._backend is not None:
            body = np.asarray(self._backend.encode(document, add_special_tokens=False).ids, np.int32)
        else:
            body = np.asarray(self._tokenizer.encode(document, add_special_tokens=False), np.int32)
        if self._bos or self._eos:
            body = np.concatenate([np.asarray(self._bos, np.int32), body, np.asarray(self._eos, np.int32)])
        return {"input_ids": body}


def _nonempty(example) -> bool:
    return len(example["input_ids"]) > 0


class _Finalize:
    """Packed rows -> the trainer's batch: input_ids, targets, segment_ids, positions, all int32[B, T]."""

    def __init__(self, pad_id: int):
        self._pad_id = pad_id

    def __call__(self, batch):
        segment_ids = batch["input_ids_segment_ids"].astype(np.int32)  # [B, T], 0 = padding
        input_ids = np.where(segment_ids > 0, batch["input_ids"], self._pad_id).astype(np.int32)
        same_segment = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)  # [B, T-1]
        targets = np.full_like(input_ids, IGNORE_INDEX)
        targets[:, :-1] = np.where(same_segment, input_ids[:, 1:], IGNORE_INDEX)
        return {
            "input_ids": input_ids,
            "targets": targets,
            "segment_ids": segment_ids,
            "positions": batch["input_ids_positions"].astype(np.int32),
        }


def _tuples_in_slices(state):
    """Undoes what JSON does to ConcatThenSplit's state: its (start, stop) slices come back as lists.

    grain compares them with the tuple (-1, -1) ("no remainder"), so after a JSON round trip (how grain and
    orbax checkpoint iterator state) a list [-1, -1] would read as a remainder and resume on the wrong batch.
    """
    if isinstance(state, dict):
        return {
            k: ({f: tuple(sl) for f, sl in v.items()} if k == "remainder_slices" else _tuples_in_slices(v))
            for k, v in state.items()
        }
    if isinstance(state, list):
        return [_tuples_in_slices(v) for v in state]
    return state


class _Checkpointable(grain.DatasetIterator):
    """The outermost iterator: its state survives a JSON round trip (see `_tuples_in_slices`)."""

    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(_tuples_in_slices(state))


class _ExactlyNIterator(grain.DatasetIterator):
    """Exactly `num_batches` batches: the parent's, then all-padding ones (no loss) once it runs dry."""

    def __init__(self, parent: grain.DatasetIterator, num_batches: int, pad_batch: dict):
        super().__init__(parent)
        self._num_batches, self._pad_batch = num_batches, pad_batch
        self._count, self._exhausted = 0, False

    def __next__(self):
        if self._count >= self._num_batches:
            raise StopIteration
        batch = None
        if not self._exhausted:
            try:
                batch = next(self._parent)
            except StopIteration:
                self._exhausted = True
        self._count += 1
        return batch if batch is not None else {k: v.copy() for k, v in self._pad_batch.items()}

    def get_state(self):
        return {"parent": self._parent.get_state(), "count": self._count, "exhausted": self._exhausted}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._count, self._exhausted = state["count"], state["exhausted"]


class _ExactlyN(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, num_batches: int, pad_batch: dict):
        super().__init__(parent)
        self._num_batches, self._pad_batch = num_batches, pad_batch

    def __iter__(self):
        return _ExactlyNIterator(self._parent.__iter__(), self._num_batches, self._pad_batch)


def combined_seed(data_seed: int, run_seed: int) -> int:
    return int(np.random.SeedSequence([int(data_seed), int(run_seed)]).generate_state(1)[0])


def split_documents(
    data_cfg, *, split: str, process_index: int = 0, process_count: int = 1, documents: Sequence | None = None
) -> Sequence:
    """The documents one process reads for `split`, in source order (before any shuffle)."""
    documents = _sources.open_documents(data_cfg) if documents is None else documents
    total = len(documents)
    if data_cfg.max_documents:
        total = min(total, data_cfg.max_documents)
    if total == 0:
        raise ConfigError(f"config.data.source={data_cfg.source!r} data.path={data_cfg.path!r}: no documents found")
    indices = split_indices(total, data_cfg.eval_fraction, split)
    if len(indices) == 0:
        raise ConfigError(
            f"config.data.eval_fraction={data_cfg.eval_fraction} leaves split {split!r} no documents ({total} in the "
            "source); use more documents (e.g. data.text_unit='paragraph' for a few large .txt files) or "
            "change the fraction"
        )
    indices = indices[process_index::process_count]
    # An eval shard may be empty (more hosts than held-out documents): that process just yields no batches,
    # or only padding with num_batches. A training shard may not: that process would have nothing to step on.
    if len(indices) == 0 and split == "train":
        raise ValueError(
            f"{process_count=} exceeds the {total} training documents of data.source="
            f"{data_cfg.source!r}; every process needs at least one"
        )
    return _Take(documents, indices)


def _token_stream(cfg, tokenize, *, split, process_index, process_count, seed, num_epochs, field):
    """One source's tokenized documents for this split and shard, shuffled: a grain IterDataset."""
    run_seed = combined_seed(cfg.seed, seed)
    if cfg.source in _sources.STREAMED:
        docs = _stream.StreamDataset(cfg, split=split, shard_index=process_index, shard_count=process_count,
                                     seed=run_seed, num_epochs=num_epochs, field=field)
        return docs.map(tokenize)
    documents = split_documents(cfg, split=split, process_index=process_index, process_count=process_count)
    ds = grain.MapDataset.source(documents)
    if cfg.shuffle and split == "train":
        ds = ds.shuffle(seed=run_seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(tokenize)
    # Tokenizing in a few threads overlaps file reads with the Rust tokenizer; order stays deterministic.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))


def make_iterator(
    data_cfg,
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    num_epochs: int | None = None,
    num_batches: int | None = None,
):
    """A checkpointable iterator over this process's packed batches (see the module docstring).

    Yields dicts of int32 numpy arrays, each [batch_size, seq_len]: 'input_ids', 'targets' (next token of the
    same segment, -100 at segment ends and padding), 'segment_ids' (1, 2, ... per row, 0 = padding) and
    'positions'. `batch_size` is per process. 'train' repeats forever unless `num_epochs` is given and
    reshuffles each epoch; 'eval' is read once, in order, and its last batch is padded. Processes' eval streams
    end after different numbers of batches, so a multi-host eval loop should pass `num_batches`: exactly that
    many batches come out, the stream's own and then all-padding ones (segment_ids 0, targets -100).
    """
    if num_epochs is None and split == "eval":
        num_epochs = 1
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"{num_batches=} must be >= 1 or None (as many as the data gives)")
    _config.validate(
        data_cfg,
        seq_len=seq_len,
        batch_size=batch_size,
        split=split,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
    )
    for name, wanted in (("bos", data_cfg.add_bos), ("eos", data_cfg.add_eos)):
        if wanted and getattr(tokenizer, f"{name}_token_id", None) is None:
            raise ConfigError(
                f"config.data.add_{name}=True but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {name}_token"
            )
    tokenize = _Tokenize(tokenizer, add_bos=data_cfg.add_bos, add_eos=data_cfg.add_eos)
    components = _config.mixture_components(data_cfg)
    streams = {}
    for field, component, _ in components:
        try:
            streams[field] = _token_stream(component, tokenize, split=split, process_index=process_index,
                                           process_count=process_count, seed=seed, num_epochs=num_epochs, field=field)
        except ConfigError as e:
            raise _config.in_component(e, field) from None
    if len(components) == 1:
        it = streams[components[0][0]]
    else:  # keyed by field, so a checkpoint's component states are matched by name
        it = grain.IterDataset.mix(streams, {field: w for field, _, w in components})
    it = it.filter(_nonempty)
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"input_ids": seq_len})
    it = it.batch(batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    finalize = _Finalize(pad_id if pad_id is not None else 0)
    it = it.map(finalize)
    if data_cfg.num_workers:
        from absl import flags  # pylint: disable=g-import-not-at-top

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app.run none were parsed
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
    if num_batches is not None:
        empty = np.zeros((batch_size, seq_len), np.int32)
        it = _ExactlyN(
            it,
            num_batches,
            finalize({"input_ids": empty, "input_ids_segment_ids": empty, "input_ids_positions": empty}),
        )
    return _Checkpointable(iter(it))
