"""Pretokenize a corpus into ArrayRecord shards of token ids, so pod hosts never tokenize on the fly.

    python -m doge_jax.data.pretokenize --source jsonl --path 'corpus/*.jsonl' --tokenizer default \\
        --out DIR --num-shards 16 [--shard-index K]
    python -m doge_jax.data.pretokenize --data configs/data/smollm_corpus.py --out gs://BUCKET/smollm \\
        --num-shards 64 --shard-index K            # the training data config, a mixture: one folder per component

writes `tokens-00000-of-00016.array_record` ... (one record per source document, in source order, token ids
without bos/eos) and `metadata.json` (tokenizer, dtype, counts). Train on them with
`data.source='arrayrecord'`, `data.path=DIR`; bos/eos, the held-out split (same documents as the raw
source, since record i is document i), shuffling and per-process sharding then work as for raw text.

Shard k holds documents [k*n/N, (k+1)*n/N), so N hosts can each write one shard with `--shard-index`.
Empty documents are written as empty records to keep that alignment. A streamed source (`data.source='hf'`)
has no length: shard k holds `split_dataset_by_node(rank=k, world_size=N)` in stream order (record i of the
shards, read in order, is then the i-th document of that interleaving). Each shard is written to a temporary
name and renamed (or uploaded whole to gs://: an object appears only when complete), so a killed run leaves
no half-written shard.

`--data FILE` takes a data preset (configs/data/*.py, the same file `python -m doge_jax.train --data=FILE`
reads); a mixture writes `OUT/<component>/` per component and prints the mixture to train on them with.
"""

from __future__ import annotations

from doge_jax.errors import ConfigError

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from doge_jax import storage
from doge_jax.data import _config
from doge_jax.data import _sources
from doge_jax.data import _stream
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
    storage.path(out_dir, field="--out")
    storage.check_reachable(out_dir, field="--out")
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    streamed = data_cfg.source in _sources.STREAMED
    if streamed:
        documents, total = None, data_cfg.max_documents or None
        _stream.open_stream(data_cfg, shard_index=0, shard_count=1)  # fails now on a bad name or text_field
    else:
        documents = _sources.open_documents(data_cfg)
        total = len(documents) if not data_cfg.max_documents else min(len(documents), data_cfg.max_documents)
        if total == 0:
            raise ConfigError(f"config.data.source={data_cfg.source!r} data.path={data_cfg.path!r}: no documents found")
    dtype = _token_dtype(len(tokenizer))
    if not storage.is_remote(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    metadata = {
        "format": "doge_jax token shards v1: one record per document, raw bytes of a 1-D array, no bos/eos",
        "dtype": dtype.name,
        "tokenizer": data_cfg.tokenizer,
        "vocab_size": len(tokenizer),
        "num_documents": total,
        "num_shards": num_shards,
        "source": {
            k: data_cfg[k] for k in ("source", "path", "text_field", "text_unit", "tfds_name", "tfds_split", "hf_split",
                                     "hf_name", "hf_config")
        },
    }
    shards = range(num_shards) if shard_index is None else [shard_index]
    tokens_written = 0
    written = 0
    for k in shards:
        final = storage.join(out_dir, shard_name(k, num_shards))
        local_dir = out_dir if not storage.is_remote(out_dir) else tempfile.mkdtemp(prefix=".doge-shard-")
        tmp = os.path.join(local_dir, f".{shard_name(k, num_shards)}.tmp")
        writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: cheap random access
        try:
            try:
                for texts in _shard_batches(data_cfg, documents, total, k, num_shards):
                    for ids in _encode(tokenizer, texts):
                        writer.write(np.asarray(ids, dtype=dtype).tobytes())
                        tokens_written += len(ids)
                        written += 1
            finally:
                writer.close()
            if storage.is_remote(out_dir):
                with open(tmp, "rb") as src, storage.path(final).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
            else:
                os.replace(tmp, final)
        finally:
            if storage.is_remote(out_dir):
                shutil.rmtree(local_dir, ignore_errors=True)
            elif os.path.exists(tmp):
                os.remove(tmp)
    if streamed:
        metadata["num_documents"] = written if shard_index is None else None  # one host knows only its shard
    storage.write_bytes_atomic(storage.join(out_dir, _sources.PRETOKENIZED_METADATA),
                               (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())
    return dict(metadata, tokens_written=tokens_written)


def _shard_batches(data_cfg, documents, total, k: int, num_shards: int):
    """Lists of up to _ENCODE_BATCH texts of shard k, in order."""
    if documents is not None:
        start, stop = k * total // num_shards, (k + 1) * total // num_shards
        for batch_start in range(start, stop, _ENCODE_BATCH):
            yield [documents[i] for i in range(batch_start, min(batch_start + _ENCODE_BATCH, stop))]
        return
    rows = _stream.open_stream(data_cfg, shard_index=k, shard_count=num_shards)
    limit = None if total is None else (k + 1) * total // num_shards - k * total // num_shards
    batch, count = [], 0
    for row in rows:
        if limit is not None and count >= limit:
            break
        text = row[data_cfg.text_field]
        batch.append(text if isinstance(text, str) else "")
        count += 1
        if len(batch) == _ENCODE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def pretokenize_config(data_cfg, *, out_dir: str, num_shards: int, shard_index: int | None = None) -> dict:
    """A data config, single source or mixture: {component field: metadata}, a folder per mixture component."""
    components = _config.mixture_components(data_cfg)
    if len(components) == 1:
        return {"config.data": pretokenize(data_cfg, out_dir=out_dir, num_shards=num_shards, shard_index=shard_index)}
    out = {}
    for field, component, _ in components:
        try:
            out[field] = pretokenize(component, out_dir=storage.join(out_dir, field.rsplit(".", 1)[1]),
                                     num_shards=num_shards, shard_index=shard_index)
        except ConfigError as e:
            raise _config.in_component(e, field) from None
    return out


def _load_preset(path: str):
    spec = importlib.util.spec_from_file_location("doge_data_preset", path)
    if spec is None or not os.path.isfile(path):
        raise ConfigError(f"--data={path!r} is not a python file with get_config()")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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
    parser.add_argument("--hf-name", default=defaults.hf_name, help="source=hf: a Hub id or json/parquet/text")
    parser.add_argument("--hf-config", default=defaults.hf_config)
    parser.add_argument("--data", default=None, help="a data preset file (configs/data/*.py), instead of the flags")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--shard-index", type=int, default=None, help="write only this shard (one per host)")
    args = parser.parse_args(argv)
    cfg = _config.data_config_defaults()
    for field in (
        "hf_name",
        "hf_config",
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
        if args.data:
            cfg = _load_preset(args.data)
        written = pretokenize_config(cfg, out_dir=args.out, num_shards=args.num_shards, shard_index=args.shard_index)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for field, meta in written.items():
        where = args.out if field == "config.data" else storage.join(args.out, field.rsplit(".", 1)[1])
        print(f"wrote {where}: {meta['num_documents']} documents, {meta['tokens_written']} tokens in this run, "
              f"{meta['num_shards']} shard(s), {meta['dtype']}")
    if len(written) > 1:
        print("train on them with data.mixture.<name> = dict(weight=..., source='arrayrecord', path=OUT/<name>)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
