"""GRPO reward functions: plain Python on decoded completions, one score in [0, 1] per completion.

    format        1 if the reply ends with the sentence "The answer is <integer>."
    answer        1 if the last "The answer is <integer>" equals the example's `answer` (verifiable)
    think_format  1 if the reply closes its thought ("</think>") before the answer sentence (thinking template,
                  whose generation prompt already opened "<think>")

The total reward is the weighted sum (`grpo.reward_weights`); each component is also logged on its own.
"""

from __future__ import annotations

from doge_jax.errors import ConfigError

import re
from collections.abc import Callable, Sequence

import numpy as np

ANSWER_RE = re.compile(r"The answer is (-?\d+)")
FINAL_RE = re.compile(r"The answer is -?\d+\.\s*$")


def format_reward(text: str, example: dict) -> float:
    del example
    return float(FINAL_RE.search(text) is not None)


def answer_reward(text: str, example: dict) -> float:
    found = ANSWER_RE.findall(text)
    return float(bool(found) and found[-1] == str(example["answer"]).strip())


def think_format_reward(text: str, example: dict) -> float:
    del example
    thought, sep, rest = text.partition("</think>")
    return float(bool(sep) and bool(thought.strip()) and FINAL_RE.search(rest) is not None)


REWARDS: dict[str, Callable[[str, dict], float]] = {
    "format": format_reward,
    "answer": answer_reward,
    "think_format": think_format_reward,
}


def check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in REWARDS]
    if unknown or not names:
        raise ConfigError(f"config.grpo.rewards={list(names)} must be a non-empty list from {sorted(REWARDS)}")


def score(texts: Sequence[str], examples: Sequence[dict], names: Sequence[str]) -> np.ndarray:
    """[N] texts and their examples → [N, len(names)] float32 component scores."""
    return np.asarray([[REWARDS[n](t, e) for n in names] for t, e in zip(texts, examples)], np.float32).reshape(
        len(texts), len(names))
