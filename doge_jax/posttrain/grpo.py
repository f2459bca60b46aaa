"""Group Relative Policy Optimization (Shao et al. 2024) with verifiable rewards, inside the one train step.

Each train step, for every prompt of the micro-batch:
  1. sample G completions with the KV-cache sampler from the current policy (weights under stop_gradient),
  2. score them on the host with the reward functions (rewards.py, through `jax.pure_callback`),
  3. advantages Â = (r − mean_group(r)) / (std_group(r) + ε), the same for every token of a completion,
  4. per completion token, with ρ = π/π_old and the k3 KL estimator to the frozen reference:
         ℓ = −[min(ρ·Â, clip(ρ, 1 − ε_clip, 1 + ε_clip)·Â) − β·(π_ref/π − log(π_ref/π) − 1)]
     averaged over every completion token of the batch (`weight` = their count).

One optimizer update per sampled batch (μ = 1), so π_old is the policy itself under stop_gradient: ρ = 1 in
value and the clip never binds, but the gradient is exactly the clipped objective's. `grpo_objective` takes
any π_old, so a multi-update variant reuses it unchanged.

Records: {"prompt": str | messages, "answer": …, …}; the whole record reaches the reward functions. A row is
prompt_ids / prompt_mask [P] (left-padded to grpo.max_prompt_len) and index [] (the record's position).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from doge_jax import sampler as sampler_lib
from doge_jax.model.token_scores import token_scores
from doge_jax.posttrain import chat, records, rewards

log = logging.getLogger("doge_jax.posttrain")


def group_advantages(group_rewards: jax.Array, eps: float = 1e-4) -> jax.Array:
    """[M, G] rewards → [M, G] advantages normalised within each group (0 where a group's rewards are equal)."""
    mean = jnp.mean(group_rewards, axis=-1, keepdims=True)
    std = jnp.std(group_rewards, axis=-1, keepdims=True, ddof=1) if group_rewards.shape[-1] > 1 else 0.0
    return (group_rewards - mean) / (std + eps)


def grpo_objective(logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array, advantages: jax.Array,
                   mask: jax.Array, *, clip_eps: float, kl_coef: float) -> dict[str, jax.Array]:
    """Token log-probs [B, N] (policy, sampling policy, reference), advantages [B], mask [B, N] → the loss
    (mean over masked tokens) and diagnostics."""
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    ratio = jnp.exp(logps - old_logps)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    surrogate = jnp.minimum(unclipped, clipped)
    log_ref_ratio = ref_logps - logps
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0  # k3: unbiased for KL(π‖π_ref), always >= 0
    per_token = -(surrogate - kl_coef * kl)
    mean = lambda x: jnp.sum(x * mask) / n  # noqa: E731
    return {"loss": mean(per_token), "kl": mean(kl), "clip_frac": mean((clipped < unclipped).astype(jnp.float32)),
            "tokens": jnp.sum(mask)}


def completion_logps(model, prompt_ids, prompt_mask, tokens, lengths, *, chunk_tokens: int = 0) -> jax.Array:
    """log π(token) of each completion token [B, N] given its left-padded prompt [B, P]; the head runs over
    chunks of `chunk_tokens` tokens (token_scores), never holding [B, N, V] logits."""
    P, N = prompt_ids.shape[1], tokens.shape[1]
    comp_mask = (jnp.arange(N)[None, :] < lengths[:, None]).astype(jnp.int32)
    seq = jnp.concatenate([prompt_ids, tokens], axis=1)  # [B, P + N]
    seq_mask = jnp.concatenate([prompt_mask.astype(jnp.int32), comp_mask], axis=1)
    positions = jnp.where(seq_mask > 0, jnp.cumsum(seq_mask, axis=-1) - 1, 0)
    hidden = model(seq, seq_mask, positions=positions, head=False).hidden[:, P - 1:P + N - 1]  # [B, N, D]
    return token_scores(model, hidden, tokens, chunk_tokens=chunk_tokens).logp  # position P-1+i predicts tokens[i]


class RewardScorer:
    """Host side of the reward callback: decodes completions and scores them against their records."""

    def __init__(self, tokenizer, recs: list[dict], names: list[str]):
        rewards.check_names(names)
        self.tokenizer, self.records, self.names = tokenizer, recs, list(names)

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray, index: np.ndarray) -> np.ndarray:
        texts = [self.tokenizer.decode(t[:n].tolist(), skip_special_tokens=True) for t, n in zip(tokens, lengths)]
        return rewards.score(texts, [self.records[int(i)] for i in index], self.names)


def make_loss(*, scorer: RewardScorer, reward_weights, group_size: int, max_new_tokens: int, stop_tokens,
              temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, clip_eps: float = 0.2,
              kl_coef: float = 0.04, loss_chunk_tokens: int = 0):
    """The trainer's loss_fn(model, batch, rng, reference=frozen model) for GRPO. The Trainer passes the
    reference with its parameters as a (sharded) argument of the step, not as constants of the program."""
    weights = jnp.asarray(reward_weights, jnp.float32)  # [R]
    if weights.shape != (len(scorer.names),):
        raise ValueError(f"grpo.reward_weights has {weights.shape[0]} entries for {len(scorer.names)} rewards")
    stops = jnp.asarray(sampler_lib.stop_array(stop_tokens))
    G = group_size

    def loss_fn(model, batch: dict, rng: jax.Array, *, reference):
        prompt_ids = jnp.repeat(batch["prompt_ids"], G, axis=0)  # [B, P], B = M·G, groups contiguous
        prompt_mask = jnp.repeat(batch["prompt_mask"], G, axis=0)
        index = jnp.repeat(batch["index"], G, axis=0)
        B = prompt_ids.shape[0]

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        policy = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest)
        policy.eval()
        tokens, _, lengths, _ = sampler_lib.sample(
            policy, prompt_ids, prompt_mask, stops, rng, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p)
        scores = jax.pure_callback(scorer, jax.ShapeDtypeStruct((B, len(scorer.names)), jnp.float32),
                                   tokens, lengths, index, vmap_method="sequential")  # [B, R]
        reward = scores @ weights  # [B]
        advantages = group_advantages(reward.reshape(-1, G)).reshape(B)

        logps = completion_logps(model, prompt_ids, prompt_mask, tokens, lengths, chunk_tokens=loss_chunk_tokens)
        ref_logps = jax.lax.stop_gradient(completion_logps(reference, prompt_ids, prompt_mask, tokens, lengths,
                                                           chunk_tokens=loss_chunk_tokens))
        mask = jnp.arange(max_new_tokens)[None, :] < lengths[:, None]
        out = grpo_objective(logps, jax.lax.stop_gradient(logps), ref_logps, advantages, mask, clip_eps=clip_eps,
                             kl_coef=kl_coef)
        metrics = {"reward": jnp.mean(reward), "kl": out["kl"], "clip_frac": out["clip_frac"],
                   "completion_len": jnp.mean(lengths.astype(jnp.float32)),
                   "reward_std": jnp.mean(jnp.std(reward.reshape(-1, G), axis=-1)), "weight": out["tokens"]}
        for i, name in enumerate(scorer.names):
            metrics[f"reward_{name}"] = jnp.mean(scores[:, i])
        return out["loss"], metrics

    return loss_fn


class PromptAssembler:
    def __init__(self, tokenizer, recs: list[dict], *, max_prompt_len: int, pad_id: int = 0):
        self.tokenizer, self.records, self.P, self.pad_id = tokenizer, recs, max_prompt_len, pad_id
        self._cache: dict[int, np.ndarray | None] = {}
        self._skipped = 0

    def example(self, i: int):
        if i not in self._cache:
            where = f"posttrain.dataset record {i}"
            if "prompt" not in self.records[i]:
                raise ValueError(f"{where}: missing 'prompt' (keys: {sorted(self.records[i])})")
            ids = chat.encode_prompt(self.tokenizer, records.as_messages(self.records[i]["prompt"], "user", where))
            if len(ids) > self.P:
                self._skipped += 1
                log.warning("%s: prompt of %d tokens > grpo.max_prompt_len=%d, skipped", where, len(ids), self.P)
                ids = None
            self._cache[i] = ids
        return self._cache[i]

    def __call__(self, stream: records.IndexStream, rows: int) -> dict:
        batch = {"prompt_ids": np.full((rows, self.P), self.pad_id, np.int32),
                 "prompt_mask": np.zeros((rows, self.P), np.int32), "index": np.zeros((rows,), np.int32)}
        for r in range(rows):
            for _ in range(len(stream.indices) + 1):
                i = stream.peek()
                ids = self.example(i)
                stream.advance()
                if ids is not None:
                    break
            else:
                raise ValueError(f"no prompt of this shard fits grpo.max_prompt_len={self.P}")
            batch["prompt_ids"][r, self.P - len(ids):] = ids
            batch["prompt_mask"][r, self.P - len(ids):] = 1
            batch["index"][r] = i
        return batch


def make_stage(config, tokenizer):
    """(loss_fn, batch source) of a GRPO config."""
    pt, g = config.posttrain, config.grpo
    recs = records.load_records(pt.dataset, hf_split=pt.hf_split)
    names = [n.strip() for n in g.rewards.split(",") if n.strip()]
    weights = [float(w) for w in g.reward_weights.split(",") if w.strip()]
    stops = sorted({tokenizer.eos_token_id, tokenizer.get_vocab().get(chat.IM_END)} - {None})
    loss_fn = make_loss(scorer=RewardScorer(tokenizer, recs, names), reward_weights=weights,
                        group_size=g.group_size, max_new_tokens=g.max_new_tokens, stop_tokens=stops,
                        temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, clip_eps=g.clip_eps,
                        kl_coef=g.kl_coef, loss_chunk_tokens=config.loss_chunk_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    assembler = PromptAssembler(tokenizer, recs, max_prompt_len=g.max_prompt_len, pad_id=pad)
    return loss_fn, records.make_source(len(recs), assembler, eval_fraction=pt.eval_fraction, seed=config.seed)
