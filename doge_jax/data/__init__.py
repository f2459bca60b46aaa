"""Pretraining data: documents from many sources, tokenized, packed into rows, batched by grain.

Public API (what the trainer calls):

    data_config_defaults()  -> ml_collections.ConfigDict    the `config.data` fields and their defaults
    load_tokenizer(spec)    -> transformers tokenizer        'default' (shipped), a dir, or a hub id
    make_iterator(data_cfg, tokenizer, *, seq_len, batch_size, split='train', process_index=0,
                  process_count=1, seed=0, num_epochs=None)
        -> a grain DatasetIterator (get_state / set_state) of per-process batches, dicts of int32 [B, T]:
           input_ids, targets (-100 = no loss), segment_ids (0 = padding), positions.

Sources: local or gs:// files (text, jsonl, parquet, pretokenized ArrayRecord shards), TFDS, `save_to_disk`
folders, and `source='hf'`: `datasets.load_dataset(..., streaming=True)` (Hub ids or json/parquet builders,
resumable exactly: `_stream.py`). `data.mixture` mixes several sources by weight (`_config.mixture_components`).

Also: `default_corpus()` (the offline corpus), `split_documents` (the documents a split/process reads), and
`python -m doge_jax.data.pretokenize` (ArrayRecord token shards, read back with data.source='arrayrecord';
it takes the same data config, mixtures included).
"""

from doge_jax.data._config import data_config_defaults
from doge_jax.data._corpus import default_corpus
from doge_jax.data._pipeline import IGNORE_INDEX, make_iterator, split_documents, split_indices
from doge_jax.data.tokenizer import load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "data_config_defaults",
    "default_corpus",
    "load_tokenizer",
    "make_iterator",
    "split_documents",
    "split_indices",
]
