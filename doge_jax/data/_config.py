"""The data config: one ConfigDict, every field with the reason for its default."""

from __future__ import annotations

from doge_jax.errors import ConfigError

import ml_collections

from doge_jax.data._sources import SOURCES, TEXT_UNITS


def data_config_defaults() -> ml_collections.ConfigDict:
    """Defaults for `config.data`; the tiny config trains on these offline."""
    c = ml_collections.ConfigDict()
    # 'default' is Python's own documentation: always present, no network (see _corpus.py).
    c.source = "default"
    # File path, glob or directory (text/jsonl/parquet/arrayrecord), several joined by commas; a dir for
    # hf_disk. A str, because ConfigDict fields keep their first type (a list default would refuse a str).
    c.path = ""
    c.text_field = "text"  # the JSON key / column / TFDS feature that holds the document
    # A .txt file is one document by default: long-range context is the point of a document.
    c.text_unit = "file"  # 'file' | 'paragraph' (blank-line separated) | 'line'
    c.tfds_name = ""
    c.tfds_split = "train"
    c.tfds_data_dir = ""  # '' = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    c.hf_split = "train"  # the split: of a saved DatasetDict (hf_disk), or of load_dataset (hf)
    # source='hf': datasets.load_dataset(hf_name, hf_config, split=hf_split, data_files=path, streaming=True).
    # hf_name is a Hub id, or a builder ('json', 'parquet', 'text') for the files data.path names (local, gs://).
    c.hf_name = ""
    c.hf_config = ""
    # Streams are shuffled in windows of this many documents (resumable exactly; see _stream.py).
    c.shuffle_window = 4096
    # Several sources mixed by weight: {name: ConfigDict(weight=w, <data fields that differ>)}; each component
    # takes every other field from this config. Empty = the single source above. configs/data/ has presets.
    c.mixture = ml_collections.ConfigDict()
    c.tokenizer = "default"  # the shipped asset, a HF tokenizer dir or a hub id
    # 1% held out by a hash of the document index: stable across runs, seeds and process counts.
    c.eval_fraction = 0.01
    c.shuffle = True
    c.seed = 0  # combined with make_iterator(seed=...) so a sweep over run seeds also reshuffles data
    c.add_bos = True
    c.add_eos = True  # eos marks the document end, so the model learns to stop
    c.num_workers = 0  # grain worker processes; 0 tokenizes in the training process (enough for tiny runs)
    c.max_documents = 0  # 0 = all; otherwise the first N documents of the source, before the split
    return c


def in_component(e: ConfigError, field: str) -> ConfigError:
    """An error about `config.data.x` raised while reading a mixture component, renamed to `field.x`."""
    message = str(e)
    if field == "config.data" or message.startswith(field + ".") or not message.startswith("config.data."):
        return e
    return ConfigError(field + message[len("config.data"):])


def mixture_components(cfg) -> list[tuple[str, object, float]]:
    """[(field path, component data config, weight)]: the components of `cfg.mixture`, or cfg alone."""
    mixture = cfg.get("mixture") or {}
    if not mixture:
        return [("config.data", cfg, 1.0)]
    base = cfg.to_dict()
    base.pop("mixture")
    out = []
    for name in sorted(mixture):
        field = f"config.data.mixture.{name}"
        part = mixture[name]
        if not hasattr(part, "items"):
            raise ConfigError(f"{field}={part!r} must be a ConfigDict(weight=..., source=..., ...)")
        part = dict(part.items())
        weight = part.pop("weight", None)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0 or weight == float("inf"):
            raise ConfigError(f"{field}.weight={weight!r} must be a positive number")
        unknown = sorted(set(part) - set(base))
        if unknown:
            raise ConfigError(f"{field}.{unknown[0]} is not a data field (fields: {sorted(base)})")
        component = ml_collections.ConfigDict({**base, **part, "mixture": ml_collections.ConfigDict()})
        out.append((field, component, float(weight)))
    return out


def validate(
    cfg, *, seq_len: int, batch_size: int, split: str, process_index: int, process_count: int, num_epochs
) -> None:
    """Raises ValueError naming the first bad field; the checks that need no I/O."""
    if cfg.get("mixture"):
        for field, component, _ in mixture_components(cfg):
            try:
                validate(component, seq_len=seq_len, batch_size=batch_size, split=split, process_index=process_index,
                         process_count=process_count, num_epochs=num_epochs)
            except ConfigError as e:
                raise in_component(e, field) from None
        return
    if cfg.source not in SOURCES:
        raise ConfigError(f"config.data.source={cfg.source!r} is not one of {SOURCES}")
    if cfg.shuffle_window < 1:
        raise ConfigError(f"config.data.shuffle_window={cfg.shuffle_window!r} must be >= 1")
    if cfg.source in ("text", "jsonl", "parquet", "hf_disk", "arrayrecord") and not cfg.path:
        raise ConfigError(f"config.data.path={cfg.path!r} must name files (or a dir) when data.source={cfg.source!r}")
    if cfg.text_unit not in TEXT_UNITS:
        raise ConfigError(f"config.data.text_unit={cfg.text_unit!r} is not one of {TEXT_UNITS}")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"config.data.eval_fraction={cfg.eval_fraction!r} must be in [0, 1)")
    if cfg.num_workers < 0:
        raise ConfigError(f"config.data.num_workers={cfg.num_workers!r} must be >= 0")
    if cfg.max_documents < 0:
        raise ConfigError(f"config.data.max_documents={cfg.max_documents!r} must be >= 0 (0 = all)")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"config.data.seed={cfg.seed!r} must be in [0, 2**32)")
    if seq_len < 2:
        raise ValueError(f"{seq_len=} must be >= 2 (one input and its next-token target)")
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be >= 1")
    if split not in ("train", "eval"):
        raise ValueError(f"{split=} must be 'train' or 'eval'")
    if not 0 <= process_index < process_count:
        raise ValueError(f"{process_index=} must be in [0, {process_count=})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"{num_epochs=} must be >= 1 or None (forever)")
