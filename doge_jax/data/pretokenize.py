"""Pretokenize a corpus into ArrayRecord shards of token ids, so pod hosts never tokenize on the fly.

    python -m doge_jax.data.pretokenize --source jsonl --path 'corpus/*.jsonl' --tokenizer default \\
        --out DIR --num-shards 16 [--shard-index K]

writes `tokens-00000-of-00016.array_record` ... (one record per source document, in source order, token ids
without bos/eos) and `metadata.json` (tokenizer, dtype, counts). Train on them with
`data.source='arrayrecord'`, `data.path=DIR`; bos/eos, the held-out split (same documents as the raw
source, since record i is document i), shuffling and per-process sharding then work as for raw text.

Shard k holds documents [k*n/N, (k+1)*n/N), so N hosts can each write one shard with `--shard-index`.
Empty documents are written as empty records to keep that alignment. Each shard is written to a temporary
name and renamed, so a killed run leaves no half-written shard.
"""

from __future__ import annotations

from doge_jax.errors import ConfigError

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from doge_jax.data import _config
from doge_jax.data import _sources
from doge_jax.data.tokenizer import load_tokenizer

_ENCODE_BATCH = 256  # documents per encode_batch call: the Rust tokenizer spreads a batch over the cores


def shard_name(index: int, count: int) -> str:
    return f"tokens-{index:05d}-of-{count:05d}.array_record"


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)  # uint16 halves the disk


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def pretokenize(data_cfg, *, out_dir: str, num_shards: int, shard_index: int | None = None) -> dict:
    """Writes the shards (all, or just `shard_index`) and metadata.json; returns the metadata."""
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

    if data_cfg.source == "arrayrecord":
        raise ConfigError("config.data.source='arrayrecord' is already pretokenized")
    if num_shards < 1:
        raise ValueError(f"--num-shards={num_shards} must be >= 1")
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index={shard_index} must be in [0, {num_shards})")
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    documents = _sources.open_documents(data_cfg)
    total = len(documents) if not data_cfg.max_documents else min(len(documents), data_cfg.max_documents)
    if total == 0:
        raise ConfigError(f"config.data.source={data_cfg.source!r} data.path={data_cfg.path!r}: no documents found")
    dtype = _token_dtype(len(tokenizer))
    os.makedirs(out_dir, exist_ok=True)
    metadata = {
        "format": "doge_jax token shards v1: one record per document, raw bytes of a 1-D array, no bos/eos",
        "dtype": dtype.name,
        "tokenizer": data_cfg.tokenizer,
        "vocab_size": len(tokenizer),
        "num_documents": total,
        "num_shards": num_shards,
        "source": {
            k: data_cfg[k] for k in ("source", "path", "text_field", "text_unit", "tfds_name", "tfds_split", "hf_split")
        },
    }
    shards = range(num_shards) if shard_index is None else [shard_index]
    tokens_written = 0
    for k in shards:
        start, stop = k * total // num_shards, (k + 1) * total // num_shards
        final = os.path.join(out_dir, shard_name(k, num_shards))
        tmp = os.path.join(out_dir, f".{shard_name(k, num_shards)}.tmp")
        writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: cheap random access
        try:
            for batch_start in range(start, stop, _ENCODE_BATCH):
                texts = [documents[i] for i in range(batch_start, min(batch_start + _ENCODE_BATCH, stop))]
                for ids in _encode(tokenizer, texts):
                    writer.write(np.asarray(ids, dtype=dtype).tobytes())
                    tokens_written += len(ids)
        finally:
            writer.close()
        os.replace(tmp, final)
    metadata_tmp = os.path.join(out_dir, f".{_sources.PRETOKENIZED_METADATA}.tmp")
    with open(metadata_tmp, "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(metadata_tmp, os.path.join(out_dir, _sources.PRETOKENIZED_METADATA))
    return dict(metadata, tokens_written=tokens_written)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = _config.data_config_defaults()
    parser = argparse.ArgumentParser(prog="python -m doge_jax.data.pretokenize", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source", default=defaults.source, choices=[s for s in _sources.SOURCES if s != "arrayrecord"]
    )
    parser.add_argument("--path", nargs="*", default=[], help="files, globs or a directory")
    for field in ("text_field", "text_unit", "tfds_name", "tfds_split", "tfds_data_dir", "hf_split", "tokenizer"):
        parser.add_argument("--" + field.replace("_", "-"), default=defaults[field])
    parser.add_argument("--max-documents", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--shard-index", type=int, default=None, help="write only this shard (one per host)")
    args = parser.parse_args(argv)
    cfg = _config.data_config_defaults()
    for field in (
        "source",
        "text_field",
        "text_unit",
        "tfds_name",
        "tfds_split",
        "tfds_data_dir",
        "hf_split",
        "tokenizer",
        "max_documents",
    ):
        cfg[field] = getattr(args, field)
    cfg.path = ",".join(args.path)
    try:
        meta = pretokenize(cfg, out_dir=args.out, num_shards=args.num_shards, shard_index=args.shard_index)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {meta['num_documents']} documents, {meta['tokens_written']} tokens "
        f"in this run, {meta['num_shards']} shard(s), {meta['dtype']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
