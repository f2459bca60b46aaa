"""data.source='hf' (datasets.load_dataset streaming, offline on local parquet / jsonl) and data.mixture:
deterministic, exactly resumable through a JSON round trip of the iterator state (what the checkpoint holds),
in the proportions of the weights, disjoint per data shard; and the bad configs, each one line."""

import collections
import json

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from doge_jax import data
from doge_jax.data import data_config_defaults
from doge_jax.errors import ConfigError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    for k in range(3):  # 3 files: shards of 2 read every other example, shards of 3 whole files
        with open(root / f"a{k}.jsonl", "w") as f:
            for i in range(60):
                f.write(json.dumps({"text": f"A{k}x{i} " + " ".join(rng.choice(WORDS, 10))}) + "\n")
    pq.write_table(pa.table({"content": [f"P{i} " + " ".join(rng.choice(WORDS, 8)) for i in range(150)]}),
                   root / "p.parquet")
    with open(root / "l.jsonl", "w") as f:
        for i in range(80):
            f.write(json.dumps({"text": f"L{i} " + " ".join(rng.choice(WORDS, 12))}) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer("default")


def mixture_cfg(root, **weights):
    c = data_config_defaults()
    c.shuffle_window = 16
    parts = {
        "a": dict(source="hf", hf_name="json", path=f"{root}/a*.jsonl"),
        "p": dict(source="hf", hf_name="parquet", path=f"{root}/p.parquet", text_field="content"),
        "l": dict(source="jsonl", path=f"{root}/l.jsonl"),
    }
    c.mixture = ml_collections.ConfigDict({k: {**parts[k], "weight": w} for k, w in weights.items()})
    return c


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _equal(x, y):
    return all(np.array_equal(x[k], y[k]) for k in x)


def test_mixture_is_deterministic_and_resumes_exactly(corpus, tokenizer):
    cfg = mixture_cfg(corpus, a=2.0, p=1.0, l=1.0)
    make = lambda: data.make_iterator(cfg, tokenizer, seq_len=32, batch_size=4, seed=3)  # noqa: E731
    reference = _batches(make(), 40)  # ~5k tokens: every stream wraps into its second epoch
    again = make()
    states = {}
    for i, batch in enumerate(reference):
        states[i] = json.loads(json.dumps(again.get_state()))  # the checkpoint's JSON round trip
        assert _equal(next(again), batch), i
    for at in (0, 7, 23, 33):
        resumed = make()
        resumed.set_state(states[at])
        for i in range(at, 40):
            assert _equal(next(resumed), reference[i]), (at, i)
    assert not _equal(reference[0], _batches(data.make_iterator(cfg, tokenizer, seq_len=32, batch_size=4, seed=4), 1)[0])


def test_mixture_follows_the_weights(corpus, tokenizer):
    cfg = mixture_cfg(corpus, a=3.0, p=1.0)
    cfg.add_bos = False
    it = data.make_iterator(cfg, tokenizer, seq_len=64, batch_size=8, seed=0)
    counts = collections.Counter()
    for batch in _batches(it, 12):
        for row, seg in zip(batch["input_ids"], batch["segment_ids"]):
            starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
            for s in starts:  # the first token of each packed segment says which source it came from
                piece = tokenizer.decode(row[s:s + 2])
                counts["a" if piece.lstrip().startswith("A") else "p" if piece.lstrip().startswith("P") else "?"] += 1
    share = counts["a"] / (counts["a"] + counts["p"])
    assert abs(share - 0.75) < 0.08, counts


def test_stream_shards_are_disjoint_and_cover_the_split(corpus):
    from doge_jax.data import _config, _stream

    for shards in (2, 3):
        cfg = _config.mixture_components(mixture_cfg(corpus, a=1.0))[0][1]
        cfg.shuffle = False
        seen = []
        for k in range(shards):
            it = _stream.StreamDataset(cfg, split="train", shard_index=k, shard_count=shards, seed=0,
                                       num_epochs=1).__iter__()
            seen.append(list(it))
        union = [d for part in seen for d in part]
        assert len(union) == len(set(union)) and all(seen)
        everything = [json.loads(line)["text"] for k in range(3) for line in open(corpus / f"a{k}.jsonl")]
        assert sorted(union) == sorted(d for d in everything if not _stream.held_out(d, cfg.eval_fraction))


@pytest.mark.parametrize("change, expect", [
    (lambda c: c.mixture.p.update(weight=0.0), "config.data.mixture.p.weight=0.0 must be a positive number"),
    (lambda c: c.mixture.p.update(weight=-1.0), "config.data.mixture.p.weight=-1.0 must be a positive number"),
    (lambda c: c.mixture.p.update(text_field="body"),
     "config.data.mixture.p.text_field='body' absent in config.data.mixture.p.hf_name='parquet'"),
    (lambda c: c.mixture.a.update(path="/nonexistent/*.jsonl"),
     "config.data.mixture.a.path='/nonexistent/*.jsonl' matched no files"),
    (lambda c: c.mixture.l.update(path="/nonexistent/*.jsonl"),
     "config.data.mixture.l.path='/nonexistent/*.jsonl' matched no files"),
    (lambda c: c.mixture.a.update(hf_name=""), "config.data.mixture.a.hf_name='' must name a Hub dataset"),
])
def test_bad_mixture_is_one_line_naming_the_field(corpus, tokenizer, change, expect):
    cfg = mixture_cfg(corpus, a=1.0, p=1.0, l=1.0)
    change(cfg)
    with pytest.raises(ConfigError) as e:
        data.make_iterator(cfg, tokenizer, seq_len=32, batch_size=4)
    assert str(e.value).startswith(expect) and "\n" not in str(e.value), str(e.value)


def test_smollm_corpus_preset_is_the_seed_mixture():
    from configs.data import smollm_corpus
    from doge_jax.data import _config

    parts = {f.rsplit(".", 1)[1]: (c.hf_name, c.hf_config, w)
             for f, c, w in _config.mixture_components(smollm_corpus.get_config())}
    assert parts["fineweb_edu"] == ("HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup", 0.7)
    assert parts["cosmopedia_v2"] == ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", 0.2)
    assert parts["python_edu"][2] == parts["finemath"][2] == 0.05
