"""Cross-Domain MoE: a shared gated MLP plus `num_experts` rank-1 experts chosen by product keys.

Expert e = (x, y) ∈ [num_keys]² (e = x·num_keys + y) scores s_x[x] + s_y[y]; a token keeps the top
`num_experts_per_tok` experts, weights them with a softmax over their scores, and adds
Σ_e w_e · act(⟨down_embed[e], h⟩) · up_embed[e] to the shared MLP's output.

Router layouts (`cfg.router_layout`):
- "transformers": transformers' `router_gate(h).view(2, B*T, -1)`. In a full forward this pairs the score
  halves of *different* tokens (row r of the [2·B·T, num_keys] view is token r // 2, half r % 2). Imported
  checkpoints use it so `from_hf` reproduces transformers bit for bit.
- "per_token": x scores from the first num_keys router outputs of the token, y scores from the last num_keys.
  Causal, and equal to what transformers computes when decoding one token at a time with batch 1.

The top-k over all num_keys² sums is found exactly from the top-k of each side: any pair in the overall top-k
has both of its coordinates in its side's top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from doge_jax import sharding as sh
from doge_jax.layers import Dense, MLP


def router_scores(logits: jax.Array, layout: str) -> jax.Array:
    """Router outputs [B, T, 2·nk] → scores [2, B·T, nk] (x side, y side) in the chosen layout."""
    B, T, two_nk = logits.shape
    nk = two_nk // 2
    if layout == "transformers":
        return logits.reshape(2, B * T, nk)
    return logits.reshape(B * T, 2, nk).transpose(1, 0, 2)


def select_experts(scores: jax.Array, num_keys: int, top_k: int) -> tuple[jax.Array, jax.Array]:
    """scores [2, M, nk] → (expert scores [M, k], expert indices [M, k]), best first."""
    side_k = min(top_k, num_keys)
    sx, ix = jax.lax.top_k(scores[0], side_k)  # [M, side_k]
    sy, iy = jax.lax.top_k(scores[1], side_k)
    pair_scores = (sx[:, :, None] + sy[:, None, :]).reshape(sx.shape[0], -1)  # [M, side_k²]
    pair_index = (ix[:, :, None] * num_keys + iy[:, None, :]).reshape(sx.shape[0], -1)
    best, pos = jax.lax.top_k(pair_scores, top_k)  # [M, k]
    return best, jnp.take_along_axis(pair_index, pos, axis=-1)


def select_experts_auto(scores: jax.Array, num_keys: int, top_k: int) -> tuple[jax.Array, jax.Array]:
    """`select_experts`, run per token shard (`doge_jax.moe_parallel`) when traced under `jax.set_mesh(mesh)`."""
    from doge_jax import moe_parallel  # moe_parallel imports this module

    if not jax.sharding.get_abstract_mesh().empty:
        return moe_parallel.sharded_select_experts(scores, num_keys, top_k)
    return select_experts(scores, num_keys, top_k)


def routing_weights(expert_scores: jax.Array, norm_topk_prob: bool) -> jax.Array:
    w = jax.nn.softmax(expert_scores.astype(jnp.float32), axis=-1)
    if norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w


def experts_reference(h: jax.Array, indices: jax.Array, weights: jax.Array, down_embed: jax.Array,
                      up_embed: jax.Array, act) -> jax.Array:
    """Σ_k w_k · act(⟨down[e_k], h⟩) · up[e_k]. h [M, D], indices/weights [M, k], tables [E, D] → [M, D]."""
    down = jnp.take(down_embed, indices, axis=0).astype(h.dtype)  # [M, k, D]
    up = jnp.take(up_embed, indices, axis=0).astype(h.dtype)  # [M, k, D]
    a = act(jnp.einsum("MkD,MD->Mk", down, h)) * weights.astype(h.dtype)  # [M, k]
    return jnp.einsum("Mk,MkD->MD", a, up)


def experts_auto(h: jax.Array, indices: jax.Array, weights: jax.Array, down_embed: jax.Array,
                 up_embed: jax.Array, act) -> jax.Array:
    """The default `experts_fn`: expert-parallel (`doge_jax.moe_parallel`) when traced under `jax.set_mesh(mesh)`
    with an `expert` axis > 1, else `experts_reference`. Same shapes as `experts_reference`."""
    from doge_jax import moe_parallel  # moe_parallel imports this module

    if moe_parallel.expert_axis_size(jax.sharding.get_abstract_mesh()) > 1:
        return moe_parallel.expert_parallel_experts(h, indices, weights, down_embed, up_embed, act)
    return experts_reference(h, indices, weights, down_embed, up_embed, act)


class CDMoE(MLP):
    """The shared MLP (inherited, so its parameters are named as in a dense layer) plus the routed experts."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        D, E, nk = cfg.hidden_size, cfg.num_experts, cfg.num_keys
        self.router_gate = Dense(D, 2 * nk, use_bias=False, logical_axes=(sh.EMBED, sh.ROUTER_KEYS),
                                 init_std=cfg.initializer_range, dtype=dtype, rngs=rngs)
        std = cfg.initializer_range
        self.down_embed = nnx.Param(std * jax.random.normal(rngs.params(), (E, D)), logical_axes=(sh.EXPERTS, sh.EMBED))
        self.up_embed = nnx.Param(std * jax.random.normal(rngs.params(), (E, D)), logical_axes=(sh.EXPERTS, sh.EMBED))
        self.dtype = dtype
        # Swappable expert computation: experts_auto picks the expert-parallel shard_map version under a mesh
        # set with jax.set_mesh; moe_parallel.use_expert_parallel(model, mesh) sets it explicitly.
        self.experts_fn = experts_auto

    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """h [B, T, D] → (out [B, T, D], router scores [2, B·T, nk] as routed, float32)."""
        cfg = self.cfg
        B, T, D = h.shape
        scores = router_scores(self.router_gate(h).astype(jnp.float32), cfg.router_layout)  # [2, B·T, nk]
        expert_scores, indices = select_experts_auto(scores, cfg.num_keys, cfg.num_experts_per_tok)
        weights = routing_weights(expert_scores, cfg.norm_topk_prob)
        routed = self.experts_fn(h.reshape(B * T, D), indices, weights, self.down_embed[...], self.up_embed[...],
                                 self.act)
        return super().__call__(h) + routed.reshape(B, T, D), scores


def load_balancing_loss(router_scores_per_layer: list[jax.Array], num_experts: int, top_k: int,
                        token_mask: jax.Array | None = None) -> jax.Array:
    """transformers' `load_balancing_loss_func` (unscaled by router_aux_loss_coef).

    router_scores_per_layer: [2, M, nk] per layer, token_mask [M] (1 = real token; the [B, T] attention mask
    flattened — in the transformers layout row m of the scores is paired with mask[m], as transformers does).
    E · Σ_e f_e · P_e with f_e the fraction of (token, slot) assignments to expert e and P_e the mean routing
    probability of e. The probability over the nk² product experts factorises, softmax(s_x ⊕ s_y) =
    softmax(s_x) ⊗ softmax(s_y), so P is computed as an [nk, nk] matmul instead of an [M, nk²] softmax.
    """
    nk = router_scores_per_layer[0].shape[-1]
    assign_total = jnp.zeros((num_experts,), jnp.float32)
    prob_total = jnp.zeros((nk, nk), jnp.float32)
    n_assign = 0.0
    n_tokens = 0.0
    for scores in router_scores_per_layer:
        scores = scores.astype(jnp.float32)
        M = scores.shape[1]
        w = jnp.ones((M,), jnp.float32) if token_mask is None else token_mask.reshape(M).astype(jnp.float32)
        _, idx = select_experts_auto(scores, nk, top_k)  # [M, k]
        assign_total += jnp.zeros((num_experts,), jnp.float32).at[idx.reshape(-1)].add(
            jnp.repeat(w, top_k))
        px, py = jax.nn.softmax(scores[0], axis=-1), jax.nn.softmax(scores[1], axis=-1)  # [M, nk]
        prob_total += jnp.einsum("M,Mx,My->xy", w, px, py)
        n_assign += jnp.sum(w) * top_k
        n_tokens += jnp.sum(w)
    tokens_per_expert = assign_total / n_assign
    prob_per_expert = jnp.zeros((num_experts,), jnp.float32).at[: nk * nk].set(prob_total.reshape(-1) / n_tokens)
    return jnp.sum(tokens_per_expert * prob_per_expert) * num_experts


def router_z_loss(router_scores_per_layer: list[jax.Array], token_mask: jax.Array | None = None) -> jax.Array:
    """Mean over layers and tokens of logsumexp² of each router side (ST-MoE's z-loss), for stability."""
    total = 0.0
    for scores in router_scores_per_layer:
        z = jax.nn.logsumexp(scores.astype(jnp.float32), axis=-1) ** 2  # [2, M]
        if token_mask is None:
            total += jnp.mean(z)
        else:
            w = token_mask.reshape(-1).astype(jnp.float32)
            total += jnp.sum(z * w) / jnp.maximum(2 * jnp.sum(w), 1.0)
    return total / len(router_scores_per_layer)


def routing_stats(router_scores_per_layer: list[jax.Array], num_experts: int, top_k: int,
                  token_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Routing statistics for the training metrics, each averaged over the MoE layers (float32 scalars).

    router_scores_per_layer: [2, M, nk] per layer (`CausalLMOutput.router_scores`); token_mask [M] (1 = real
    token) as in `load_balancing_loss`. Returns
      experts_used        fraction of the num_experts experts that got at least one (token, slot) assignment
      load_max            the most assignments any one expert got
      load_mean           assignments per expert on average (= tokens · top_k / num_experts)
      load_max_over_mean  load_max / load_mean: 1 is perfectly balanced, num_experts is one expert taking all
    """
    used, load_max, load_mean, ratio = [], [], [], []
    for scores in router_scores_per_layer:
        M = scores.shape[1]
        w = jnp.ones((M,), jnp.float32) if token_mask is None else token_mask.reshape(M).astype(jnp.float32)
        _, idx = select_experts_auto(scores.astype(jnp.float32), scores.shape[-1], top_k)  # [M, k]
        load = jnp.zeros((num_experts,), jnp.float32).at[idx.reshape(-1)].add(jnp.repeat(w, top_k))  # [E]
        used.append(jnp.mean((load > 0).astype(jnp.float32)))
        load_max.append(jnp.max(load))
        load_mean.append(jnp.sum(load) / num_experts)
        ratio.append(load_max[-1] / jnp.maximum(load_mean[-1], 1e-9))
    mean = lambda xs: jnp.mean(jnp.stack(xs))  # noqa: E731
    return {"experts_used": mean(used), "load_max": mean(load_max), "load_mean": mean(load_mean),
            "load_max_over_mean": mean(ratio)}
