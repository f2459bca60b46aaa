"""The tokenizer CLI trains a SentencePiece model that transformers loads; the shipped default loads."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from doge_jax.cli import tokenizer as tokenizer_cli
from doge_jax.data import tokenizer as doge_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # indentation and  double  spaces survive",
    "Numbers like 12345 and 3.14159 are split into digits.",
    "Unicode: naïve café, Straße, 日本語, emoji 🙂 fall back to bytes when unseen.",
]
CHAT = [{"role": "system", "content": "You are Doge."}, {"role": "user", "content": "Hello there!"}]


def _check_tokenizer(tok):
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [4, 5]
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids  # byte fallback: nothing is unknown
        assert tok.decode(ids) == text
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are Doge.<|im_end|>\n<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(CHAT, tokenize=False)
    assert no_prompt.endswith("Hello there!<|im_end|>\n")
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == 4 and ids.count(5) == 2  # the chat markers are single special tokens


def test_cli_trains_a_tokenizer_that_transformers_loads(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            SAMPLES[:3] * 3
            + [
                "A small corpus of plain English sentences, repeated with variations for the tokenizer.",
                "Packing documents into rows keeps every token of the batch busy.",
            ]
            * 20
        )
    )
    out = tmp_path / "tok"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "doge_jax.cli.tokenizer",
            "train",
            "--corpus",
            str(corpus),
            "--vocab-size",
            "320",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert result.returncode == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 320
    _check_tokenizer(tok)
    made_by = json.loads((out / "doge_tokenizer.json").read_text())
    assert made_by["vocab_size"] == 320 and made_by["corpus"] == [str(corpus)]


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert (
        tokenizer_cli.main(
            ["train", "--corpus", str(tmp_path / "none*.txt"), "--vocab-size", "512", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "matched no files" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert tokenizer_cli.main(["train", "--vocab-size", "100", "--out", str(tmp_path / "x")]) == 2
    assert "--vocab-size=100" in capsys.readouterr().err


def test_shipped_default_tokenizer_loads():
    tok = doge_tokenizer.load_tokenizer("default")
    assert len(tok) == 8192
    _check_tokenizer(tok)
    # Small enough to ship, and it says how it was made.
    files = os.listdir(doge_tokenizer.DEFAULT_TOKENIZER_DIR)
    assert sum(os.path.getsize(os.path.join(doge_tokenizer.DEFAULT_TOKENIZER_DIR, f)) for f in files) < 1 << 20
    with open(os.path.join(doge_tokenizer.DEFAULT_TOKENIZER_DIR, "doge_tokenizer.json")) as f:
        assert "--corpus default --vocab-size 8192" in json.load(f)["command"]
    # English from the corpus it was trained on compresses well (bytes per token).
    text = "Return a new list containing all items from the iterable in ascending order."
    assert len(text) / len(tok.encode(text, add_special_tokens=False)) > 3.0


def test_load_tokenizer_local_dirs_and_errors(tmp_path):
    tok = doge_tokenizer.load_tokenizer(doge_tokenizer.DEFAULT_TOKENIZER_DIR)
    assert tok.eos_token == "</s>"
    tok.save_pretrained(str(tmp_path / "copy"))  # any HF tokenizer.json dir works, e.g. a Doge-tokenizer copy
    assert doge_tokenizer.load_tokenizer(str(tmp_path / "copy")).encode("hi") == tok.encode("hi")
    with pytest.raises(ValueError, match=r"data\.tokenizer='/nonexistent/tok'"):
        doge_tokenizer.load_tokenizer("/nonexistent/tok")
    with pytest.raises(ValueError, match=r"data\.tokenizer=''"):
        doge_tokenizer.load_tokenizer("")
