"""Packing, splitting, sharding, shuffling and resuming of the grain pipeline (CPU, no network).

Most tests read hand-made token shards in which document d is the tokens 1000*d + 10 + [0, 1, 2, ...], so a
token says which document it came from and where: any target that crosses a document, any reordering and
any lost or duplicated token is visible.
"""

import json
import os

import numpy as np
import pytest

from doge_jax import data
from doge_jax.data import _sources

BOS, EOS, PAD = 1, 2, 3  # the shipped tokenizer's ids


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer("default")


def _doc_tokens(d: int, length: int) -> np.ndarray:
    return (1000 * d + 10 + np.arange(length)).astype(np.int32)


def write_token_shards(out_dir, lengths, num_shards=2):
    """Token shards in the pretokenize format, document d of length lengths[d]."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(out_dir, exist_ok=True)
    n = len(lengths)
    for k in range(num_shards):
        writer = ArrayRecordWriter(
            os.path.join(out_dir, f"tokens-{k:05d}-of-{num_shards:05d}.array_record"), "group_size:1"
        )
        for d in range(k * n // num_shards, (k + 1) * n // num_shards):
            writer.write(_doc_tokens(d, lengths[d]).tobytes())
        writer.close()
    with open(os.path.join(out_dir, _sources.PRETOKENIZED_METADATA), "w") as f:
        json.dump({"dtype": "int32", "num_documents": n}, f)
    return str(out_dir)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 90, size=60).tolist()  # many shorter than a row, some longer
    return write_token_shards(tmp_path_factory.mktemp("shards"), lengths), lengths


def _cfg(path, **overrides):
    cfg = data.data_config_defaults()
    cfg.source = "arrayrecord"
    cfg.path = path
    cfg.eval_fraction = 0.2
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _segments(batches):
    """Yields (tokens, positions, targets) of each segment of each row, in stream order."""
    for b in batches:
        for row in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][row]
            for s in np.unique(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                yield b["input_ids"][row, where], b["positions"][row, where], b["targets"][row, where]


def check_packing_invariants(batches, batch_size, seq_len):
    for b in batches:
        assert set(b) == {"input_ids", "targets", "segment_ids", "positions"}
        for v in b.values():
            assert v.shape == (batch_size, seq_len) and v.dtype == np.int32
        for row in range(batch_size):
            seg, ids, tgt = b["segment_ids"][row], b["input_ids"][row], b["targets"][row]
            # Segments are 1, 2, 3... left to right, contiguous, padding (0) only at the end.
            used = seg[seg > 0]
            assert np.all(np.diff(seg[: len(used)]) >= 0) and np.all(seg[len(used) :] == 0)
            if len(used):
                assert used[0] == 1 and np.all(np.diff(np.unique(used)) == 1)
            # Padding carries the pad id and no loss.
            assert np.all(ids[seg == 0] == PAD) and np.all(tgt[seg == 0] == -100)
    for tokens, positions, targets in _segments(batches):
        np.testing.assert_array_equal(positions, np.arange(len(tokens)))  # positions reset per segment
        np.testing.assert_array_equal(targets[:-1], tokens[1:])  # next token, same segment
        assert targets[-1] == -100  # never across a segment (document) end
        body = tokens[(tokens != BOS) & (tokens != EOS)]
        assert len(set((body - 10) // 1000)) <= 1  # one document per segment
        assert np.all(np.diff(body) == 1)  # contiguous, in order


def test_packing_invariants_and_every_token_once(shards, tokenizer):
    path, lengths = shards
    cfg = _cfg(path, shuffle=False, eval_fraction=0.0)
    batches = list(data.make_iterator(cfg, tokenizer, seq_len=32, batch_size=3, num_epochs=1))
    check_packing_invariants(batches, 3, 32)
    # The stream, read in order, is exactly bos + doc + eos for every document, each once.
    stream = np.concatenate([t for t, _, _ in _segments(batches)])
    expected = np.concatenate([np.concatenate([[BOS], _doc_tokens(d, n), [EOS]]) for d, n in enumerate(lengths)])
    np.testing.assert_array_equal(stream, expected)
    # Only the final batch pads: rows of seq_len tokens, no gaps.
    assert all(np.all(b["segment_ids"] > 0) for b in batches[:-1])


def test_no_bos_eos(shards, tokenizer):
    path, lengths = shards
    cfg = _cfg(path, shuffle=False, eval_fraction=0.0, add_bos=False, add_eos=False)
    batches = list(data.make_iterator(cfg, tokenizer, seq_len=16, batch_size=4, num_epochs=1))
    stream = np.concatenate([t for t, _, _ in _segments(batches)])
    np.testing.assert_array_equal(stream, np.concatenate([_doc_tokens(d, n) for d, n in enumerate(lengths)]))


def _docs_seen(batches):
    return {
        int((t[(t != BOS) & (t != EOS)][0] - 10) // 1000)
        for t, _, _ in _segments(batches)
        if np.any((t != BOS) & (t != EOS))
    }


def test_held_out_split_is_disjoint_and_complete(shards, tokenizer):
    path, lengths = shards
    cfg = _cfg(path)
    train = _docs_seen(data.make_iterator(cfg, tokenizer, seq_len=64, batch_size=2, num_epochs=1))
    held_out = _docs_seen(data.make_iterator(cfg, tokenizer, seq_len=64, batch_size=2, split="eval"))
    assert train and held_out and not train & held_out
    assert train | held_out == set(range(len(lengths)))
    assert abs(len(held_out) / len(lengths) - 0.2) < 0.15
    # The held-out set is a function of the index alone: the same whatever the seed.
    other_seed = _docs_seen(data.make_iterator(_cfg(path, seed=5), tokenizer, seq_len=64, batch_size=2, split="eval"))
    assert other_seed == held_out
    # ...and it does not move when the split is indexed again (split_indices is pure).
    np.testing.assert_array_equal(data.split_indices(60, 0.2, "eval"), data.split_indices(60, 0.2, "eval"))


def test_process_shards_are_disjoint_and_cover(shards, tokenizer):
    path, _ = shards
    cfg = _cfg(path)
    everything = _docs_seen(data.make_iterator(cfg, tokenizer, seq_len=64, batch_size=2, num_epochs=1))
    per_process = [
        _docs_seen(
            data.make_iterator(cfg, tokenizer, seq_len=64, batch_size=2, num_epochs=1, process_index=i, process_count=3)
        )
        for i in range(3)
    ]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not per_process[i] & per_process[j]
    assert set().union(*per_process) == everything
    # Each process reads only its own documents (no read-then-drop).
    docs = data.split_documents(cfg, split="train", process_index=1, process_count=3)
    assert {int((docs[i][0] - 10) // 1000) for i in range(len(docs))} == per_process[1]


def test_deterministic_and_seeded(shards, tokenizer):
    path, _ = shards

    def first(seed, data_seed=0):
        it = data.make_iterator(_cfg(path, seed=data_seed), tokenizer, seq_len=32, batch_size=2, seed=seed)
        return np.concatenate([b["input_ids"] for b in _take(it, 4)])

    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))
    assert not np.array_equal(first(0), first(0, data_seed=3))


def test_train_repeats_with_a_new_shuffle_each_epoch(shards, tokenizer):
    path, lengths = shards
    cfg = _cfg(path, add_bos=False, add_eos=False, eval_fraction=0.0)
    it = data.make_iterator(cfg, tokenizer, seq_len=8, batch_size=1)
    one_epoch = sum(lengths)
    tokens = np.concatenate([next(it)["input_ids"][0] for _ in range(2 * one_epoch // 8 + 4)])
    first, second = tokens[:one_epoch], tokens[one_epoch : 2 * one_epoch]

    def doc_order(t):
        starts = t[(t - 10) % 1000 == 0]
        return ((starts - 10) // 1000).tolist()

    assert sorted(doc_order(first)) == list(range(len(lengths)))  # every document once per epoch
    assert sorted(doc_order(second)) == list(range(len(lengths)))
    assert doc_order(first) != doc_order(second)  # reshuffled
    assert doc_order(first) != list(range(len(lengths)))  # shuffled at all


@pytest.mark.parametrize("k", [0, 1, 3])
def test_resume_from_state_gives_the_same_batches(shards, tokenizer, k):
    path, _ = shards
    cfg = _cfg(path)
    it = data.make_iterator(cfg, tokenizer, seq_len=24, batch_size=2, seed=11)
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores: plain JSON
    expected = _take(it, 5)
    fresh = data.make_iterator(cfg, tokenizer, seq_len=24, batch_size=2, seed=11)
    fresh.set_state(state)
    for want, got in zip(expected, _take(fresh, 5), strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_resume_across_an_epoch_boundary(shards, tokenizer):
    path, lengths = shards
    cfg = _cfg(path, eval_fraction=0.0)
    batches_per_epoch = (sum(lengths) + 2 * len(lengths)) // (64 * 2)
    it = data.make_iterator(cfg, tokenizer, seq_len=64, batch_size=2)
    _take(it, batches_per_epoch - 1)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = data.make_iterator(cfg, tokenizer, seq_len=64, batch_size=2)
    fresh.set_state(state)
    for want, got in zip(expected, _take(fresh, 4), strict=True):
        np.testing.assert_array_equal(want["input_ids"], got["input_ids"])


def test_eval_reads_once_and_num_batches_pads(shards, tokenizer):
    path, _ = shards
    cfg = _cfg(path)
    natural = list(data.make_iterator(cfg, tokenizer, seq_len=32, batch_size=2, split="eval"))
    assert natural
    padded = list(
        data.make_iterator(cfg, tokenizer, seq_len=32, batch_size=2, split="eval", num_batches=len(natural) + 2)
    )
    assert len(padded) == len(natural) + 2
    for b in padded[-2:]:
        assert np.all(b["segment_ids"] == 0) and np.all(b["targets"] == -100)
    cut = list(data.make_iterator(cfg, tokenizer, seq_len=32, batch_size=2, split="eval", num_batches=1))
    np.testing.assert_array_equal(cut[0]["input_ids"], natural[0]["input_ids"])


def test_default_corpus_end_to_end(tokenizer):
    corpus = data.default_corpus()
    assert len(corpus) > 300 and sum(map(len, corpus)) > 1_000_000
    assert len(set(corpus)) == len(corpus)
    assert any("Abstract Base Classes" in d for d in corpus)
    cfg = data.data_config_defaults()
    it = data.make_iterator(cfg, tokenizer, seq_len=64, batch_size=4, seed=1)
    batches = _take(it, 3)
    check_packing_invariants_text(batches, 4, 64)
    text = tokenizer.decode(batches[0]["input_ids"][0])
    assert sum(c.isalpha() for c in text) > 0.5 * len(text)  # English, not byte soup


def test_default_corpus_is_kept_on_disk_under_a_key_of_its_sources(tmp_path, monkeypatch):
    """The first call parses the standard library and writes the cache; later processes read it back (the same
    tuple); a damaged cache file is parsed again and rewritten; a changed source file changes the key."""
    import sysconfig

    from doge_jax.data import _corpus

    monkeypatch.setenv("DOGE_JAX_CACHE", str(tmp_path))
    files = _corpus._module_files(sysconfig.get_paths()["stdlib"])
    built = _corpus._build(files)
    _corpus.default_corpus.cache_clear()
    try:
        assert _corpus.default_corpus() == built
        path = _corpus.cache_file()
        assert path.startswith(str(tmp_path)) and os.path.isfile(path)
        assert [os.path.basename(p) for p in os.listdir(os.path.dirname(path))] == [os.path.basename(path)]
        with open(path, "w") as f:
            json.dump(["a stale document"], f)
        _corpus.default_corpus.cache_clear()
        assert _corpus.default_corpus() == ("a stale document",)  # what is on disk is what it reads
        with open(path, "w") as f:
            f.write('["cut sho')
        _corpus.default_corpus.cache_clear()
        assert _corpus.default_corpus() == built
        with open(path) as f:
            assert tuple(json.load(f)) == built
    finally:
        _corpus.default_corpus.cache_clear()
    source = tmp_path / "mod.py"
    source.write_text('"""A docstring."""\n')
    before = _corpus.cache_file([("mod", str(source))])
    os.utime(source, ns=(1, 1))
    assert _corpus.cache_file([("mod", str(source))]) != before


def check_packing_invariants_text(batches, batch_size, seq_len):
    for b in batches:
        for v in b.values():
            assert v.shape == (batch_size, seq_len) and v.dtype == np.int32
    for tokens, positions, targets in _segments(batches):
        np.testing.assert_array_equal(positions, np.arange(len(tokens)))
        np.testing.assert_array_equal(targets[:-1], tokens[1:])
        assert targets[-1] == -100


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("source", "webtext", "data.source='webtext'"),
        ("eval_fraction", 1.5, "data.eval_fraction=1.5"),
        ("text_unit", "page", "data.text_unit='page'"),
        ("num_workers", -1, "data.num_workers=-1"),
    ],
)
def test_bad_config_values_name_the_field(tokenizer, field, value, message):
    cfg = data.data_config_defaults()
    cfg[field] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        data.make_iterator(cfg, tokenizer, seq_len=16, batch_size=1)


def test_bad_arguments_name_themselves(tokenizer):
    cfg = data.data_config_defaults()
    with pytest.raises(ValueError, match="seq_len=1"):
        data.make_iterator(cfg, tokenizer, seq_len=1, batch_size=1)
    with pytest.raises(ValueError, match="process_index=2"):
        data.make_iterator(cfg, tokenizer, seq_len=8, batch_size=1, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="split='test'"):
        data.make_iterator(cfg, tokenizer, seq_len=8, batch_size=1, split="test")


def test_worker_processes_resume_too(shards, tokenizer):
    # One iterator, rewound with set_state: each fresh set of worker processes costs seconds to start.
    path, _ = shards
    it = data.make_iterator(_cfg(path, num_workers=1), tokenizer, seq_len=24, batch_size=2, seed=4)
    try:
        _take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        expected = _take(it, 3)
        _take(it, 2)
        it.set_state(state)
        got = _take(it, 3)
    finally:
        it.close()
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(want["input_ids"], have["input_ids"])
    check_packing_invariants(got, 2, 24)


def test_more_hosts_than_eval_documents(shards, tokenizer):
    path, _ = shards
    cfg = _cfg(path, eval_fraction=0.05)
    num_eval = len(data.split_indices(60, 0.05, "eval"))
    assert 0 < num_eval < 8
    seen = set()
    for i in range(8):
        batches = list(
            data.make_iterator(
                cfg, tokenizer, seq_len=16, batch_size=2, split="eval", process_index=i, process_count=8, num_batches=50
            )
        )
        assert len(batches) == 50  # lockstep, even for a process with no documents at all
        seen |= _docs_seen(batches)
    assert len(seen) == num_eval
    with pytest.raises(ValueError, match="process_count=100 exceeds"):
        data.make_iterator(cfg, tokenizer, seq_len=16, batch_size=2, process_index=99, process_count=100)
