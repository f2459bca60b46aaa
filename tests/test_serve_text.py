"""Stop-string hold-back and incremental detokenization: the text a stream shows equals the final answer."""

from __future__ import annotations

import random

import pytest

from serve.detokenize import IncrementalDetokenizer
from serve.stops import StopStringFilter


def run_filter(stops, pieces):
    f = StopStringFilter(stops)
    out, stopped = [], False
    for piece in pieces:
        released, stopped = f.push(piece)
        out.append(released)
        if stopped:
            break
    if not stopped:
        out.append(f.flush())
    return out, stopped


def test_stop_across_pieces_is_trimmed_and_never_shown():
    out, stopped = run_filter(["<|im_end|>"], ["Hello", " world<|im", "_en", "d|> more"])
    assert stopped and "".join(out) == "Hello world"
    assert out[1] == " world"  # "<|im" was held back: it might have been (and was) a stop string


def test_false_alarm_is_released():
    out, stopped = run_filter(["STOP"], ["go ST", "ay here"])
    assert not stopped and "".join(out) == "go STay here"
    assert out[0] == "go "


def test_earliest_of_several_stops_wins():
    out, stopped = run_filter(["bb", "a"], ["xxbb", "a"])
    assert stopped and "".join(out) == "xx"
    out, _ = run_filter(["cd", "bcx"], ["abc", "d"])
    assert "".join(out) == "ab"


def test_held_back_text_is_flushed_at_the_end():
    out, stopped = run_filter(["END"], ["almost E", "N"])
    assert not stopped and "".join(out) == "almost EN"


@pytest.mark.parametrize("seed", range(20))
def test_random_pieces_match_whole_string_trim(seed):
    rng = random.Random(seed)
    alphabet = "ab c"
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    out, stopped = run_filter(stops, pieces)
    hits = [text.find(s) for s in stops if s in text]
    expected = text[: min(hits)] if hits else text
    assert "".join(out) == expected and stopped == bool(hits)


@pytest.fixture(scope="module")
def tokenizer():
    from serve_testing import make_tokenizer

    return make_tokenizer(vocab_size=400)


def test_incremental_detokenization_handles_split_characters(tokenizer):
    text = "Grüße, 世界! naïve café — 🐕 dogs"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # the small vocab splits multi-byte characters over byte tokens
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer("prefix:", add_special_tokens=False)["input_ids"])
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer("hi", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "hi"
