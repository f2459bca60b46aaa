"""What an export tells transformers about tokens: the tokenizer encodes a document the way training did (BOS
when data.add_bos), and generation_config.json ends generation at every end token the chat template uses."""

import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

import convert
import doge_jax
from doge_jax import checkpoint as ckpt
from doge_jax.data import load_tokenizer
from doge_jax.data._pipeline import _Tokenize
from doge_jax.data.tokenizer import save_for_export
from doge_jax.model import decoder as model_lib

TINY = dict(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, keep_window_size=16, bos_token_id=1, eos_token_id=2,
            pad_token_id=3)
DOCUMENTS = ["The quick brown fox.\n\n    def f(x):\n        return x  # indented code, double  spaces",
             "Zürich 1234 — naïve café; emoji 🐶 and a tab\tend"]


def _export(tmp_path, *, add_bos, chat_template=True):
    cfg = doge_jax.DogeConfig(**TINY)
    workdir = str(tmp_path / "run")
    ckpt.save_params(workdir, 1, ckpt.params_of(model_lib.build(cfg, seed=0)), cfg)
    tok = load_tokenizer("default")
    if not chat_template:
        tok.chat_template = None
    save_for_export(tok, os.path.join(workdir, ckpt.TOKENIZER), add_bos=add_bos)
    return convert.to_hf(workdir, str(tmp_path / "hf"))


@pytest.mark.parametrize("add_bos", [True, False])
def test_exported_tokenizer_encodes_as_training_did(tmp_path, add_bos):
    out = _export(tmp_path, add_bos=add_bos)
    exported = AutoTokenizer.from_pretrained(out)
    training = _Tokenize(load_tokenizer("default"), add_bos=add_bos, add_eos=False)
    for text in DOCUMENTS:
        assert exported(text)["input_ids"] == training(text)["input_ids"].tolist()
    assert exported(DOCUMENTS[0])["input_ids"][0] == 1 if add_bos else 1 not in exported(DOCUMENTS[0])["input_ids"]
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f)["add_bos_token"] is add_bos
    # The chat path tokenizes the rendered template without special tokens: unchanged by add_bos.
    chat = exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert exported(chat, add_special_tokens=False)["input_ids"][0] == exported.convert_tokens_to_ids("<|im_start|>")


def test_generation_config_lists_every_end_token_of_the_chat_template(tmp_path):
    out = _export(tmp_path, add_bos=True)
    with open(os.path.join(out, "generation_config.json")) as f:
        gen = json.load(f)
    tok = AutoTokenizer.from_pretrained(out)
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("</s>"), tok.convert_tokens_to_ids("<|im_end|>")] == [2, 5]

    import torch
    from transformers import AutoModelForCausalLM

    from transformers import LogitsProcessor, LogitsProcessorList

    class EndTurn(LogitsProcessor):  # makes <|im_end|> the greedy choice
        def __call__(self, input_ids, scores):
            return torch.where(torch.arange(scores.shape[-1]) == 5, 1e4, scores)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("hello", return_tensors="pt").input_ids
    with torch.no_grad():  # stops there on the exported generation config alone
        generated = model.generate(ids, max_new_tokens=8, do_sample=False,
                                   logits_processor=LogitsProcessorList([EndTurn()]))
    assert generated[0, -1].item() == 5 and generated.shape[1] == ids.shape[1] + 1


def test_without_chat_template_only_eos_ends(tmp_path):
    out = _export(tmp_path, add_bos=True, chat_template=False)
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 2
    assert np.array_equal(AutoTokenizer.from_pretrained(out)("a b")["input_ids"][:1], [1])
