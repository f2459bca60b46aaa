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
