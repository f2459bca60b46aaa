"""The LM head's per-token scores without the [B, T, V] logits: final norm, LM head and log-softmax over chunks.

    out = model(ids, positions=..., segment_ids=..., head=False)     # out.hidden [B, T, D]: no logits
    s = token_scores(model, out.hidden, targets)                     # s.logp, s.lse, s.greedy: [B, T] each
    nll_sum, count, lse_sq_sum = cross_entropy_sums(s, targets)      # what `loss.token_cross_entropy` returns

Everything that reduces logits to a number per token goes through here: pretraining's cross-entropy and z-loss
(trainer/step.py), SFT (the same loss), DPO's sequence log-probs, GRPO's completion log-probs and the eval
scorer. `model(ids).logits` stays for whoever wants the logits themselves.

How: the T axis is cut into chunks of c positions (B kept whole, so a chunk is [B, c] tokens, batch-sharded as
the residual stream is); a `lax.scan` runs the final norm, the head (tied or not) and the log-softmax on one
chunk at a time, under `jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of keeping
them. Peak memory: O(B·c·V) for one chunk's logits and their gradient, instead of O(B·T·V) for all of them,
plus [B, T] per-token results. The head's weight gradient accumulates over the chunks in the scan.

Chunk size: `chunk_tokens` tokens per chunk across the batch (c = chunk_tokens // B, a power of two); 0 picks
about 2^26 logits per chunk (256 MiB of float32: 2048 tokens at a 32k vocabulary); -1 computes all logits at
once (the unchunked reference, for tests and the memory table's "before").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from doge_jax.model.loss import IGNORE_INDEX
from doge_jax.parallel import sharding as sh

AUTO_CHUNK_LOGITS = 2**26  # logits per chunk when chunk_tokens = 0: 256 MiB of float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenScores:
    """Per-token results, each [B, T]; positions whose target is IGNORE_INDEX hold 0 / False."""

    logp: jax.Array  # float32: log p(target | prefix)
    lse: jax.Array  # float32: logsumexp of the logits (for the z-loss)
    greedy: jax.Array  # bool: target == argmax of the logits


def chunk_length(batch: int, length: int, vocab: int, chunk_tokens: int = 0) -> int:
    """Positions per chunk along T: a power of two (≥ 1), or `length` when one chunk covers it."""
    if chunk_tokens < 0:
        return length
    per_row = (chunk_tokens if chunk_tokens > 0 else AUTO_CHUNK_LOGITS // vocab) // max(batch, 1)
    c = 1 << max(per_row, 1).bit_length() - 1  # the largest power of two <= per_row
    return length if c >= length else c


def scores_from_logits(logits: jax.Array, targets: jax.Array) -> TokenScores:
    """logits [..., V] (any float dtype; reduced in float32), targets [...] → TokenScores.

    The target's logit is picked by comparing a vocabulary iota with the target (a masked sum, exact: one term
    and zeros), not by `take_along_axis`. In the TPU-compiled train step the gather was an op of its own reading
    the chunk's whole [..., V] logits from HBM again (doge_20m on v5p-8: 17.2 GB a step), and its gradient a
    scatter; the masked sum fuses into the pass logsumexp already makes over the logits, and its gradient into
    softmax − one-hot. `python benchmarks/step_cost.py --presets doge_20m --slices v5p-8`: 295.2 → 278.0 GB per
    chip per step, MFU ceiling 34.5 → 36.6 % (doge_jax/kernels/README.md)."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == safe[..., None].astype(jnp.int32)
    picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    greedy = jnp.argmax(logits, axis=-1) == safe
    return TokenScores(logp=jnp.where(valid, picked - lse, 0.0), lse=jnp.where(valid, lse, 0.0),
                       greedy=valid & greedy)


def token_scores(model, hidden: jax.Array, targets: jax.Array, *, chunk_tokens: int = 0) -> TokenScores:
    """hidden [B, T, D]: the residual stream before the final norm (`model(..., head=False).hidden`); targets
    [B, T] int (IGNORE_INDEX = not scored) → TokenScores [B, T], never holding more than one chunk's logits."""
    B, T, D = hidden.shape
    c = chunk_length(B, T, model.cfg.vocab_size, chunk_tokens)
    if c >= T:
        return scores_from_logits(model.logits(hidden), targets)
    n = -(-T // c)
    pad = n * c - T
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    hs = hidden.reshape(B, n, c, D).transpose(1, 0, 2, 3)  # [n, B, c, D]
    ts = targets.reshape(B, n, c).transpose(1, 0, 2)  # [n, B, c]
    hs = sh.constrain(hs, (None, sh.BATCH, sh.LENGTH, None))
    ts = sh.constrain(ts, (None, sh.BATCH, sh.LENGTH))

    @jax.checkpoint  # keep only the chunk's inputs: its logits are recomputed in the backward pass
    def chunk(h, t):
        return scores_from_logits(model.logits(h), t)

    _, stacked = jax.lax.scan(lambda carry, x: (carry, chunk(*x)), None, (hs, ts))
    return jax.tree.map(lambda x: x.transpose(1, 0, 2).reshape(B, n * c)[:, :T], stacked)  # [B, T]


def cross_entropy_sums(scores: TokenScores, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of −log p over counted tokens, number of counted tokens, sum of logsumexp²): the contract of
    `loss.token_cross_entropy`, from scores."""
    valid = targets != IGNORE_INDEX
    return -jnp.sum(scores.logp), jnp.sum(valid), jnp.sum(scores.lse * scores.lse)
