"""Per-token log-likelihoods of many token sequences: batched, length-bucketed, optionally on a device mesh.

    scorer = Scorer(model, pad_id=tok.pad_token_id)
    out = scorer([(tokens, n), ...])     # per request: (log p of the last n tokens [n] float32, greedy [n] bool)

Request i scores `tokens[-n:]`, each conditioned on everything before it: the model reads `tokens[:-1]` and
position t predicts `tokens[t + 1]`. Sequences are right-padded (a causal model never looks right, so padding
changes nothing and needs no mask — lm-eval's `hf` backend feeds transformers the same way) to a length bucket
(16, 24, 32, 48, 64, 96, ... : at most 1.5× the longest row) and grouped into batches of a bucketed row count,
so a whole evaluation compiles a handful of programs. The final norm, LM head and log-softmax run only on a
window of each row's last W positions (W: the bucket of the pass's largest n), so a multiple-choice pass of
short continuations pays the vocabulary-sized head for 16 positions a row, not for the whole context.

On a mesh the parameters are placed by the logical-axis table (`doge_jax.sharding`), the batch is split over the
data-parallel axes, and results come back replicated, so every process reads them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from doge_jax.model.token_scores import token_scores
from doge_jax.parallel import sharding as sh

MIN_BUCKET = 16


def length_bucket(n: int) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, ... (2^k and 1.5·2^k) that holds n: at most 1.5× n past 16."""
    if n < 1:
        raise ValueError(f"length n={n} must be >= 1")
    bucket = MIN_BUCKET
    while bucket < n:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return bucket


def rows_bucket(n: int, full: int, multiple: int = 1) -> int:
    """Rows of a pass holding n requests: `full` for a full pass, else the next power of two ≥ n (never more
    than `full`), rounded up to a multiple of the data-parallel size."""
    rows = full if n >= full else min(full, 1 << math.ceil(math.log2(n)))
    return -(-rows // multiple) * multiple


def _token_logprobs(graphdef, state, ids, targets, at):
    """ids [B, T] int32, at [B, W] int32 (the positions scored; None: all T), targets [B, W] int32 (the token
    after each) → (log p(targets) [B, W] float32, targets == argmax [B, W] bool)."""
    model = nnx.merge(graphdef, state)
    model.eval()
    hidden = model(ids, logits_at=at, head=False).hidden  # [B, W, D]
    scores = token_scores(model, hidden, targets)  # the head over chunks: never [B, W, V] for a long window
    return scores.logp, scores.greedy


@functools.lru_cache(maxsize=None)
def _compiled(mesh: Mesh | None):
    """One jitted function per mesh, shared by every Scorer: evaluating again during training (same graphdef,
    same shapes) reuses the programs compiled the first time."""
    if mesh is None:
        return jax.jit(_token_logprobs, static_argnums=0)
    replicated = NamedSharding(mesh, P())
    return jax.jit(_token_logprobs, static_argnums=0, out_shardings=(replicated, replicated))


class Scorer:
    """Scores token sequences with one model (see the module docstring).

    batch_size: most rows per forward pass; max_batch_tokens: most rows × bucket length per pass (bounds the
    [B, T, V] logits: 8192 tokens × a 32k vocabulary is 1 GiB of float32)."""

    def __init__(self, model: nnx.Module, *, pad_id: int = 0, batch_size: int = 16, max_batch_tokens: int = 8192,
                 mesh: Mesh | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if max_batch_tokens < MIN_BUCKET:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} must be >= {MIN_BUCKET}")
        self.pad_id = int(pad_id)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.mesh = mesh
        self.graphdef, state = nnx.split(model)
        self._fn = _compiled(mesh)
        if mesh is None:
            self.state, self.dp = state, 1
            self._batch_sharding = None
        else:
            self.state = jax.device_put(state, sh.state_shardings(state, mesh))
            self._batch_sharding = sh.batch_sharding(mesh)
            spec = self._batch_sharding.spec[0]
            axes = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
            self.dp = math.prod(mesh.shape[a] for a in axes)
        self.compiled_shapes: set[tuple[int, int, int]] = set()  # (rows, length, scored window) of every program run

    def _run(self, ids: np.ndarray, targets: np.ndarray, at: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        self.compiled_shapes.add(ids.shape + (targets.shape[1],))
        if self._batch_sharding is not None:
            ids, targets, at = (None if x is None else jax.device_put(x, self._batch_sharding)
                                for x in (ids, targets, at))
        picked, greedy = self._fn(self.graphdef, self.state, ids, targets, at)
        return np.asarray(picked), np.asarray(greedy)

    def __call__(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """requests: (tokens, n) with 1 <= n < len(tokens). Returns, in order, (logprobs [n], greedy [n])."""
        lengths = []
        for i, (tokens, n) in enumerate(requests):
            if not 1 <= n < len(tokens):
                raise ValueError(f"requests[{i}]: n={n} must be in [1, {len(tokens) - 1}] for {len(tokens)} tokens")
            lengths.append(len(tokens) - 1)
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(requests)
        by_bucket: dict[int, list[int]] = {}
        for i in sorted(range(len(requests)), key=lambda i: -lengths[i]):
            by_bucket.setdefault(length_bucket(lengths[i]), []).append(i)
        for T, members in by_bucket.items():
            per_pass = max(1, min(self.batch_size, self.max_batch_tokens // T))
            for start in range(0, len(members), per_pass):
                chunk = members[start:start + per_pass]
                B = rows_bucket(len(chunk), per_pass, self.dp)
                ids = np.full((B, T), self.pad_id, np.int32)
                targets = np.full((B, T), self.pad_id, np.int32)
                for row, i in enumerate(chunk):
                    tokens = np.asarray(requests[i][0], np.int32)
                    ids[row, :len(tokens) - 1] = tokens[:-1]
                    targets[row, :len(tokens) - 1] = tokens[1:]
                # Only the last n positions of a row are scored: the LM head runs on a window of W (a bucket
                # holding the chunk's largest n) ending at each row's last token, not on all T positions.
                W = length_bucket(max(requests[i][1] for i in chunk))
                at = None
                if W < T:
                    ends = np.zeros(B, np.int64)
                    ends[:len(chunk)] = [lengths[i] for i in chunk]
                    at = np.maximum(ends[:, None] - W + np.arange(W), 0).astype(np.int32)  # [B, W]
                    targets = np.take_along_axis(targets, at, axis=1)
                picked, greedy = self._run(ids, targets, at)
                for row, i in enumerate(chunk):
                    n, end = requests[i][1], (lengths[i] if at is None else W)
                    out[i] = (picked[row, end - n:end], greedy[row, end - n:end])
        return out

