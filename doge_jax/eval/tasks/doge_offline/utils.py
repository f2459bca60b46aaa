"""Offline tasks built from prose every CPython ships and the default training corpus leaves out: the
docstrings of the standard library's own test suite (`Lib/test/test_*.py`; `doge_jax.data`'s default corpus
skips test packages). Deterministic for a given Python version, nothing downloaded.

    pydoc_cloze  multiple choice: the first 60 % of a docstring's words, then its true ending among 4 (the
                 other 3 are endings of other docstrings, drawn with a fixed seed)
    pydoc_ppl    perplexity (loglikelihood_rolling) of whole docstrings
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import sysconfig

import datasets
import numpy as np

MIN_WORDS, MAX_WORDS = 20, 100  # contexts + endings of ~30-150 tokens: they fit a 256-token tiny model
MAX_DOCS = 200


@functools.lru_cache(maxsize=1)
def _docstrings() -> tuple[str, ...]:
    """The first MAX_DOCS distinct docstrings of MIN_WORDS-MAX_WORDS words, files in name order. Parsing stops
    there: the whole test suite is ~1,000 files and 10-20 s of `ast.parse` on our CPU, for the same list."""
    root = sysconfig.get_paths()["stdlib"]
    seen, out = set(), []
    for path in sorted(glob.glob(os.path.join(root, "test", "test_*.py"))):
        if len(out) >= MAX_DOCS:
            break
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                text = " ".join(doc.split()) if doc else ""
                if MIN_WORDS <= len(text.split()) <= MAX_WORDS and text not in seen:
                    seen.add(text)
                    out.append(text)
    if not out:
        raise FileNotFoundError(f"no test-suite docstrings under {root}/test: this Python ships without Lib/test")
    return tuple(out[:MAX_DOCS])


def cloze(**_) -> datasets.DatasetDict:
    docs = _docstrings()
    rng = np.random.default_rng(0)
    splits = [(d.split()[: int(0.6 * len(d.split()))], d.split()[int(0.6 * len(d.split())):]) for d in docs]
    rows = []
    for i, (head, tail) in enumerate(splits):
        others = rng.choice([j for j in range(len(splits)) if j != i], size=3, replace=False)
        endings = [" ".join(tail)] + [" ".join(splits[j][1]) for j in others]
        order = rng.permutation(4)
        rows.append({"context": " ".join(head), "endings": [endings[k] for k in order],
                     "label": int(np.argmin(order))})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def prose(**_) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": d} for d in _docstrings()])})
