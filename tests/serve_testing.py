"""A tiny random Doge model and an offline tokenizer, saved the way the exporter saves real ones.

Tests and benchmarks build their model with `make_tiny_model_dir` instead of downloading one: the weights are
random, so the text is gibberish, but every code path (chat template, special tokens, KV cache, sampling) is
the one a real exported Doge takes. Only transformers and tokenizers are used, so the serve tests stay jax-free.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

# The project's default Doge chat template (ChatML turns, an assistant header when asked for a reply): the one
# file the shipped tokenizer and the exporter use, read as a file so these tests need no jax.
DOGE_CHAT_TEMPLATE = (Path(__file__).resolve().parents[1] / "doge_jax" / "assets" / "tokenizer"
                      / "chat_template.jinja").read_text(encoding="utf-8")

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|im_start|>", "<|im_end|>"]


def _training_text() -> list[str]:
    """A few hundred KB of English prose from the stdlib's own docstrings: offline and always installed."""
    import argparse
    import asyncio
    import collections
    import json
    import logging
    import pathlib
    import re
    import string
    import textwrap
    import unittest

    texts: list[str] = []
    for module in (argparse, asyncio, collections, json, logging, pathlib, re, string, textwrap, unittest):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                texts.append(doc)
    return texts


def make_tokenizer(vocab_size: int = 512, chat_template: bool = True):
    """A byte-level BPE tokenizer with Doge's special tokens, wrapped as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    if chat_template:
        fast.chat_template = DOGE_CHAT_TEMPLATE
    return fast


def make_tiny_model_dir(
    path: str | os.PathLike,
    chat_template: bool = True,
    vocab_size: int = 512,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Write a random `DogeForCausalLM` plus tokenizer to `path` and return it.

    Defaults are the smallest shape that still exercises every Doge piece (2 layers, 2 heads, DMA mask).
    `config_overrides` go to `DogeConfig`, e.g. `hidden_size=256, num_hidden_layers=8` for a Doge-20M shape.
    The config's vocab is the tokenizer's length, so every sampled id decodes.
    """
    import torch
    from transformers import DogeConfig, DogeForCausalLM

    path = Path(path)
    tokenizer = make_tokenizer(vocab_size=vocab_size, chat_template=chat_template)
    config_kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        keep_window_size=256,  # below the context, so long requests exercise the DMA top-k path
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        # A chat turn ends at <|im_end|>, a plain document at <|end_of_text|>: generation stops on either.
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    config_kwargs.update(config_overrides)
    torch.manual_seed(seed)
    model = DogeForCausalLM(DogeConfig(**config_kwargs)).eval()
    # Random init leaves A (the DMA gate) at zero; a non-zero A makes the dynamic mask actually vary per key.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.A.normal_(0.0, 0.5)
    # Written beside the target and renamed, so a crash never leaves a half-written model dir.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path


def pydoc_eval_text() -> list[str]:
    """The pydoc eval text: docstrings of CPython's own test suite (`Lib/test/test_*.py`), 20-100 words each,
    first 200 — the documents of doge_jax's `pydoc_ppl` task (doge_jax/eval/tasks/doge_offline/utils.py, which
    needs `datasets`; repeated here so the serve tests stay jax-free). The training text above never sees them."""
    import ast
    import glob
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    seen, out = set(), []
    for path in sorted(glob.glob(os.path.join(root, "test", "test_*.py"))):
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                text = " ".join(doc.split()) if doc else ""
                if 20 <= len(text.split()) <= 100 and text not in seen:
                    seen.add(text)
                    out.append(text)
    if not out:
        raise FileNotFoundError(f"no test-suite docstrings under {root}/test: this Python ships without Lib/test")
    return out[:200]


def train_tiny_doge(steps: int = 150, seed: int = 2):
    """(model, tokenizer): a 2-layer Doge (hidden 64, 4 heads / 2 kv heads, tied 512-token vocab) trained for
    `steps` AdamW steps of 16 x 64 tokens on the stdlib prose above, so its logits are peaked the way a real
    model's are (random weights give near-flat ones). About 10 s on 2 cores; deterministic for a seed."""
    import torch
    from transformers import DogeConfig, DogeForCausalLM

    tokenizer = make_tokenizer(vocab_size=512)
    ids = tokenizer("\n\n".join(_training_text()))["input_ids"]
    data = torch.tensor(ids[: 64 * (len(ids) // 64)]).view(-1, 64)  # [sequences, 64]
    torch.manual_seed(seed)
    config = DogeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        keep_window_size=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id],
                        pad_token_id=tokenizer.pad_token_id)
    model = DogeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.A.normal_(0.0, 0.5)  # A = 0 makes every dt equal: a top-k of ties
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer
