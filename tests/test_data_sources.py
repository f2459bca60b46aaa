"""Every data.source reads the documents it should, from tiny files made here (no network)."""

import json
import os
import re

import numpy as np
import pytest

from doge_jax import data
from doge_jax.data import pretokenize

DOCS = [f"Document {i}: the {'quick ' * (i % 5)}brown fox number {i} jumps over {i * 7} lazy dogs." for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer("default")


def _cfg(source, path="", **overrides):
    cfg = data.data_config_defaults()
    cfg.source = source
    cfg.path = path
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _all_documents(cfg):
    cfg.eval_fraction = 0.0
    docs = data.split_documents(cfg, split="train")
    return [docs[i] for i in range(len(docs))]


def _write_jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({field: d, "id": i}) + "\n")
            if i % 7 == 3:
                f.write("\n")  # blank lines are not documents
    return str(path)


def _assert_batches_hold(cfg, tokenizer, docs):
    """The pipeline over `cfg` yields batches that decode back to the documents, in order."""
    cfg.shuffle, cfg.eval_fraction = False, 0.0
    batches = list(data.make_iterator(cfg, tokenizer, seq_len=64, batch_size=2, num_epochs=1))
    ids = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches])
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for d in docs:
        assert d in text


def test_text_units(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("Alpha one.\nAlpha two.\n\nAlpha three.\n")
    (tmp_path / "b.txt").write_text("Beta one.\n")
    glob = str(tmp_path / "*.txt")
    assert _all_documents(_cfg("text", glob)) == ["Alpha one.\nAlpha two.\n\nAlpha three.\n", "Beta one.\n"]
    assert _all_documents(_cfg("text", glob, text_unit="paragraph")) == [
        "Alpha one.\nAlpha two.",
        "Alpha three.",
        "Beta one.",
    ]
    assert _all_documents(_cfg("text", glob, text_unit="line")) == [
        "Alpha one.",
        "Alpha two.",
        "Alpha three.",
        "Beta one.",
    ]
    # Several specs joined by commas, or a directory.
    both = f"{tmp_path / 'b.txt'},{tmp_path / 'a.txt'}"
    assert _all_documents(_cfg("text", both))[0] == "Beta one.\n"
    assert len(_all_documents(_cfg("text", str(tmp_path)))) == 2
    _assert_batches_hold(_cfg("text", glob, text_unit="paragraph"), tokenizer, ["Alpha three.", "Beta one."])


def test_jsonl(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "part0.jsonl", DOCS[:25])
    _write_jsonl(tmp_path / "part1.jsonl", DOCS[25:])
    cfg = _cfg("jsonl", str(tmp_path / "*.jsonl"))
    assert _all_documents(cfg) == DOCS
    assert _all_documents(_cfg("jsonl", str(tmp_path / "*.jsonl"), max_documents=5)) == DOCS[:5]
    _assert_batches_hold(cfg, tokenizer, DOCS)


def test_jsonl_reads_are_thread_safe(tmp_path):
    """grain's prefetch threads read one jsonl source at once: every document comes back whole from every thread
    (a shared seek + read position once returned a line read from another thread's offset)."""
    from concurrent.futures import ThreadPoolExecutor

    docs = [f"doc {i} " + "word " * (i % 13) for i in range(2000)]
    cfg = _cfg("jsonl", _write_jsonl(tmp_path / "many.jsonl", docs))
    cfg.eval_fraction = 0.0
    source = data.split_documents(cfg, split="train")
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(docs)), 4))
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: source[int(i)], order, chunksize=1))
    assert got == [docs[i] for i in order]


def test_jsonl_errors_name_the_field(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "x.jsonl", DOCS[:3], field="content")
    with pytest.raises(ValueError, match=r"data\.text_field='text' absent in .*x\.jsonl line 1"):
        _all_documents(_cfg("jsonl", path))
    missing = str(tmp_path / "nothing" / "*.jsonl")
    with pytest.raises(ValueError, match=re.escape(f"data.path={missing!r} matched no files")):
        data.make_iterator(_cfg("jsonl", missing), tokenizer, seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match=r"data\.path='' must name files"):
        data.make_iterator(_cfg("jsonl", ""), tokenizer, seq_len=8, batch_size=1)
    # A row without the field deep in the file fails when it is read, naming its line.
    with open(tmp_path / "late.jsonl", "w") as f:
        f.write(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "oops"}) + "\n")
    with pytest.raises(ValueError, match=r"absent in .*late\.jsonl line 2"):
        list(
            data.make_iterator(
                _cfg("jsonl", str(tmp_path / "late.jsonl"), eval_fraction=0.0),
                tokenizer,
                seq_len=8,
                batch_size=1,
                num_epochs=1,
            )
        )
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents found"):
        data.make_iterator(_cfg("jsonl", str(tmp_path / "empty.jsonl")), tokenizer, seq_len=8, batch_size=1)


def test_parquet(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": DOCS[:30], "n": list(range(30))}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": DOCS[30:], "n": list(range(10))}), tmp_path / "b.parquet")
    cfg = _cfg("parquet", str(tmp_path / "*.parquet"))
    assert _all_documents(cfg) == DOCS
    _assert_batches_hold(cfg, tokenizer, DOCS[::7])
    with pytest.raises(ValueError, match=r"data\.text_field='body' absent"):
        _all_documents(_cfg("parquet", str(tmp_path / "*.parquet"), text_field="body"))


def test_hf_disk(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "plain"))
    cfg = _cfg("hf_disk", str(tmp_path / "plain"))
    assert _all_documents(cfg) == DOCS
    _assert_batches_hold(cfg, tokenizer, DOCS[:3])
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": DOCS[:4]}),
            "validation": datasets.Dataset.from_dict({"body": DOCS[4:6]}),
        }
    ).save_to_disk(str(tmp_path / "dict"))
    assert (
        _all_documents(_cfg("hf_disk", str(tmp_path / "dict"), text_field="body", hf_split="validation")) == DOCS[4:6]
    )
    with pytest.raises(ValueError, match=r"data\.hf_split='test'"):
        _all_documents(_cfg("hf_disk", str(tmp_path / "dict"), text_field="body", hf_split="test"))


def _build_tiny_tfds(data_dir):
    """A TFDS dataset built here, in the ArrayRecord format, with no download and no TensorFlow."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class DogeTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "id": np.int32})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(DOCS[:30]), "test": self._generate_examples(DOCS[30:])}

        def _generate_examples(self, docs):
            for i, d in enumerate(docs):
                yield i, {"text": d, "id": i}

    DogeTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return "doge_tiny_text"


def test_tfds(tmp_path, tokenizer):
    name = _build_tiny_tfds(str(tmp_path))
    cfg = _cfg("tfds", tfds_name=name, tfds_split="test", tfds_data_dir=str(tmp_path))
    assert sorted(_all_documents(cfg)) == sorted(DOCS[30:])  # TFDS shuffles examples when it writes them
    train = _cfg("tfds", tfds_name=name, tfds_data_dir=str(tmp_path))
    assert len(_all_documents(train)) == 30
    _assert_batches_hold(
        _cfg("tfds", tfds_name=name, tfds_split="test", tfds_data_dir=str(tmp_path)), tokenizer, DOCS[30:]
    )
    with pytest.raises(ValueError, match=r"data\.tfds_name='no_such_dataset'"):
        _all_documents(_cfg("tfds", tfds_name="no_such_dataset", tfds_data_dir=str(tmp_path)))


def test_pretokenized_shards_match_raw_text(tmp_path, tokenizer):
    src = _write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = str(tmp_path / "tokens")
    assert pretokenize.main(["--source", "jsonl", "--path", src, "--out", out, "--num-shards", "3"]) == 0
    assert sorted(os.listdir(out)) == ["metadata.json"] + [pretokenize.shard_name(k, 3) for k in range(3)]
    metadata = json.load(open(os.path.join(out, "metadata.json")))
    assert metadata["num_documents"] == len(DOCS) and metadata["dtype"] == "uint16"
    shards = _all_documents(_cfg("arrayrecord", out))
    assert [tokenizer.decode(s) for s in shards] == DOCS
    # Same held-out documents, same shuffle, same batches as tokenizing the raw text on the fly.
    for split in ("train", "eval"):
        kw = dict(seq_len=32, batch_size=2, split=split, seed=3, num_epochs=1)
        raw = list(data.make_iterator(_cfg("jsonl", src, eval_fraction=0.2), tokenizer, **kw))
        pre = list(data.make_iterator(_cfg("arrayrecord", out, eval_fraction=0.2), tokenizer, **kw))
        assert len(raw) == len(pre) > 0
        for a, b in zip(raw, pre):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_pretokenize_one_shard_per_host(tmp_path):
    src = _write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = str(tmp_path / "tokens")
    for k in (1, 0):  # hosts finish in any order
        assert (
            pretokenize.main(
                ["--source", "jsonl", "--path", src, "--out", out, "--num-shards", "2", "--shard-index", str(k)]
            )
            == 0
        )
    assert len(_all_documents(_cfg("arrayrecord", out))) == len(DOCS)


def test_arrayrecord_without_metadata_is_refused(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "x.array_record"), "group_size:1")
    writer.write(b"\x00\x01")
    writer.close()
    with pytest.raises(ValueError, match="metadata.json"):
        _all_documents(_cfg("arrayrecord", str(tmp_path)))
