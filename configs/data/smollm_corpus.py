"""The seed's pretraining mixture, streamed from the Hub: fineweb-edu : cosmopedia-v2 : python-edu : finemath
= 7 : 2 : 0.5 : 0.5 (SmallDoges/small-doge, docs/training.md: `mix_datasets_by_radio`), tokenized with the
Doge tokenizer (32768 tokens, matching the presets' vocab_size).

    python -m doge_jax.train --config=configs/doge_60m.py --data=configs/data/smollm_corpus.py \\
        --workdir=gs://BUCKET/doge60m [--data.mixture.finemath.weight=0.1]

Each host streams only its own shard of every component (doge_jax/data/_stream.py) and the mixture schedule
is fixed by the weights, so a resumed run reads exactly the documents an uninterrupted one would have.
To tokenize once instead: `python -m doge_jax.data.pretokenize --data=configs/data/smollm_corpus.py
--out gs://BUCKET/smollm --num-shards 64` writes one folder of ArrayRecord shards per component.

python-edu: the smollm-corpus `python-edu` config holds Software Heritage blob ids, not the code text, so this
preset reads the same educational-Python filter applied to StarCoderData (`jon-tow/starcoderdata-python-edu`,
text in `content`). Any other component can be swapped the same way:
`--data.mixture.python_edu.hf_name=... --data.mixture.python_edu.text_field=...`.
"""

import ml_collections

from doge_jax.data import data_config_defaults


def _hub(weight: float, name: str, config: str = "", text_field: str = "text") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(weight=weight, source="hf", hf_name=name, hf_config=config,
                                          hf_split="train", text_field=text_field))


def get_config() -> ml_collections.ConfigDict:
    c = data_config_defaults()
    c.tokenizer = "SmallDoge/Doge-tokenizer"
    c.source = "hf"  # what a component states when it does not say (each one does here)
    c.mixture = ml_collections.ConfigDict(dict(
        fineweb_edu=_hub(0.7, "HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup"),
        cosmopedia_v2=_hub(0.2, "HuggingFaceTB/smollm-corpus", "cosmopedia-v2"),
        python_edu=_hub(0.05, "jon-tow/starcoderdata-python-edu", text_field="content"),
        finemath=_hub(0.05, "HuggingFaceTB/finemath", "finemath-4plus"),
    ))
    return c
