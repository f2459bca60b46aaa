"""Direct Preference Optimization: (prompt, chosen, rejected) pairs against a frozen reference model.

With log-ratios h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)) summed over the reply
tokens, the per-pair losses are

    sigmoid (Rafailov et al. 2023):  −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)      (ε = label_smoothing, cDPO)
    ipo     (Azar et al. 2023):      (h − 1/(2β))²  with log-probs averaged over the reply tokens (as TRL)

The reference log-probs are computed inside the train step by the frozen reference (by default the
`init_from` checkpoint), which the Trainer passes to the loss as `reference=`: its parameters are a sharded
argument of the compiled step, placed like the policy's. Records: {"prompt": str | messages, "chosen": str |
message | messages, "rejected": …} (TRL's conversational or plain formats).

A row holds the pair: input_ids / targets / segment_ids / positions [2, T] (chosen first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from doge_jax.model.loss import IGNORE_INDEX
from doge_jax.model.token_scores import TokenScores, token_scores
from doge_jax.posttrain import chat, records
from doge_jax.posttrain.sft import example_arrays

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logps(scores: TokenScores, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token scores [B, T] (doge_jax.model.token_scores), targets [B, T] (−100 = not counted) → (summed
    log-probs [B], counted tokens [B])."""
    return jnp.sum(scores.logp, axis=-1), jnp.sum(targets != IGNORE_INDEX, axis=-1)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """Per-pair DPO losses from sequence log-probs (each [B]). Returns losses [B], the implicit rewards
    β·(log π − log π_ref) of chosen / rejected [B], and h [B]."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type={loss_type!r} must be one of {list(LOSS_TYPES)}")
    return {"losses": losses, "chosen_rewards": beta * chosen_ratio, "rejected_rewards": beta * rejected_ratio,
            "h": h}


def pair_logps(model, batch: dict, *, chunk_tokens: int = 0) -> tuple[jax.Array, jax.Array]:
    """A batch of pairs [M, 2, T] → (summed reply log-probs [M, 2], reply tokens [M, 2]); the head runs over
    chunks of `chunk_tokens` tokens (token_scores), never holding [2M, T, V] logits."""
    M, _, T = batch["input_ids"].shape
    flat = lambda x: x.reshape(M * 2, T)  # noqa: E731  [2M, T]: chosen and rejected rows interleaved
    out = model(flat(batch["input_ids"]), positions=flat(batch["positions"]), segment_ids=flat(batch["segment_ids"]),
                head=False)
    targets = flat(batch["targets"])
    logps, counts = sequence_logps(token_scores(model, out.hidden, targets, chunk_tokens=chunk_tokens), targets)
    return logps.reshape(M, 2), counts.reshape(M, 2)


def make_loss(*, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0, loss_chunk_tokens: int = 0):
    """The trainer's loss_fn(model, batch, rng, reference=frozen model) for DPO (each pair weighs 1)."""

    def loss_fn(model, batch: dict, rng: jax.Array, *, reference):
        del rng
        logps, counts = pair_logps(model, batch, chunk_tokens=loss_chunk_tokens)
        ref = jax.lax.stop_gradient(pair_logps(reference, batch, chunk_tokens=loss_chunk_tokens)[0])  # [M, 2]
        if loss_type == "ipo":  # IPO compares per-token averages
            n = jnp.maximum(counts, 1).astype(jnp.float32)
            logps, ref = logps / n, ref / n
        out = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=beta, loss_type=loss_type,
                       label_smoothing=label_smoothing)
        M = logps.shape[0]
        metrics = {"dpo_loss": jnp.mean(out["losses"]), "reward_chosen": jnp.mean(out["chosen_rewards"]),
                   "reward_rejected": jnp.mean(out["rejected_rewards"]),
                   "reward_margin": jnp.mean(out["chosen_rewards"] - out["rejected_rewards"]),
                   "reward_accuracy": jnp.mean((out["h"] > 0).astype(jnp.float32)),
                   "logp_chosen": jnp.mean(logps[:, 0]), "weight": jnp.float32(M)}
        return jnp.mean(out["losses"]), metrics

    return loss_fn


def encode_pair(tokenizer, record: dict, seq_len: int, where: str):
    """One record → ((ids, targets) chosen, (ids, targets) rejected), or None if a reply loses all its tokens."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"{where}: missing {key!r} (keys: {sorted(record)})")
    prompt = records.as_messages(record["prompt"], "user", where)
    out = []
    for key in ("chosen", "rejected"):
        reply = records.as_messages(record[key], "assistant", where)
        if reply[-1]["role"] != "assistant":
            raise ValueError(f"{where}: {key} must end with an assistant message")
        ids, mask = chat.encode_reply(tokenizer, prompt + reply[:-1], reply[-1])
        arrays = example_arrays(ids, mask, seq_len)
        if arrays is None:
            return None
        out.append(arrays)
    return tuple(out)


class DPOAssembler:
    def __init__(self, tokenizer, recs: list[dict], *, seq_len: int, pad_id: int = 0):
        self.tokenizer, self.records = tokenizer, recs
        self.seq_len, self.pad_id = seq_len, pad_id
        self._cache: dict[int, tuple | None] = {}

    def example(self, i: int):
        if i not in self._cache:
            self._cache[i] = encode_pair(self.tokenizer, self.records[i], self.seq_len,
                                         f"posttrain.dataset record {i}")
        return self._cache[i]

    def __call__(self, stream: records.IndexStream, rows: int) -> dict:
        T = self.seq_len
        batch = {"input_ids": np.full((rows, 2, T), self.pad_id, np.int32),
                 "targets": np.full((rows, 2, T), IGNORE_INDEX, np.int32),
                 "segment_ids": np.zeros((rows, 2, T), np.int32), "positions": np.zeros((rows, 2, T), np.int32)}
        for r in range(rows):
            for _ in range(len(stream.indices) + 1):
                pair = self.example(stream.peek())
                stream.advance()
                if pair is not None:
                    break
            else:
                raise ValueError(f"no preference pair of this shard fits seq_len={T}")
            for side, (ids, targets) in enumerate(pair):
                n = len(ids)
                batch["input_ids"][r, side, :n] = ids
                batch["targets"][r, side, :n] = targets
                batch["segment_ids"][r, side, :n] = 1
                batch["positions"][r, side, :n] = np.arange(n)
        return batch


def make_source(config, tokenizer):
    pt = config.posttrain
    recs = records.load_records(pt.dataset, hf_split=pt.hf_split)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    assembler = DPOAssembler(tokenizer, recs, seq_len=config.seq_len, pad_id=pad)
    return records.make_source(len(recs), assembler, eval_fraction=pt.eval_fraction, seed=config.seed)
