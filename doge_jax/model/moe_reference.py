"""Cross-Domain MoE, the plain-jnp reference: routing by product keys, the routed experts, and the routing
losses and statistics (computed once, from what was routed).

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

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
    """What one CDMoE layer routed: the router scores [2, M, nk] float32 (x side, y side, in the layer's router
    layout), the chosen experts [M, k] int32, best first (M = B·T tokens, or score rows in that layout), and
    how many of the M·k pairs the expert-parallel dispatch dropped over capacity ([] int32; None: none can be)."""

    scores: jax.Array
    indices: jax.Array
    dropped: jax.Array | None = None


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoutingSummary:
    """The MoE terms of a forward pass, computed once from every layer's `Routing`.

    aux_loss: transformers' `load_balancing_loss_func` (unscaled by router_aux_loss_coef); z_loss: ST-MoE's
    router z-loss (unscaled); stats: routing statistics for the training metrics (see `routing_summary`)."""

    aux_loss: jax.Array
    z_loss: jax.Array
    stats: dict


def routing_summary(routings: list[Routing], num_experts: int, token_mask: jax.Array | None = None
                    ) -> RoutingSummary:
    """Load balancing loss, router z-loss and routing statistics over the MoE layers.

    token_mask [M] (1 = real token; the [B, T] attention mask flattened — in the transformers layout row m of
    the scores is paired with mask[m], as transformers does).

    Load balancing: E · Σ_e f_e · P_e with f_e the fraction of (token, slot) assignments to expert e and P_e the
    mean routing probability of e. The probability over the nk² product experts factorises,
    softmax(s_x ⊕ s_y) = softmax(s_x) ⊗ softmax(s_y), so P is an [nk, nk] matmul instead of an [M, nk²] softmax.
    Z-loss: mean over layers and tokens of logsumexp² of each router side.
    Statistics, each averaged over the layers (float32 scalars):
      experts_used        fraction of the num_experts experts that got at least one (token, slot) assignment
      load_max            the most assignments any one expert got
      load_mean           assignments per expert on average (= tokens · top_k / num_experts)
      load_max_over_mean  load_max / load_mean: 1 is perfectly balanced, num_experts is one expert taking all
      dropped_fraction    pairs dropped over capacity / all M·k pairs (padding included; 0 without a capacity)
    """
    nk = routings[0].scores.shape[-1]
    assign_total = jnp.zeros((num_experts,), jnp.float32)
    prob_total = jnp.zeros((nk, nk), jnp.float32)
    n_assign = n_tokens = z_total = 0.0
    used, load_max, load_mean, ratio, dropped = [], [], [], [], []
    for routing in routings:
        scores = routing.scores.astype(jnp.float32)  # [2, M, nk]
        M, top_k = routing.indices.shape
        w = jnp.ones((M,), jnp.float32) if token_mask is None else token_mask.reshape(M).astype(jnp.float32)
        load = jnp.zeros((num_experts,), jnp.float32).at[routing.indices.reshape(-1)].add(jnp.repeat(w, top_k))
        assign_total += load
        px, py = jax.nn.softmax(scores[0], axis=-1), jax.nn.softmax(scores[1], axis=-1)  # [M, nk]
        prob_total += jnp.einsum("M,Mx,My->xy", w, px, py)
        n_assign += jnp.sum(w) * top_k
        n_tokens += jnp.sum(w)
        z = jax.nn.logsumexp(scores, axis=-1) ** 2  # [2, M]
        z_total += jnp.mean(z) if token_mask is None else jnp.sum(z * w) / jnp.maximum(2 * jnp.sum(w), 1.0)
        used.append(jnp.mean((load > 0).astype(jnp.float32)))
        load_max.append(jnp.max(load))
        load_mean.append(jnp.sum(load) / num_experts)
        ratio.append(load_max[-1] / jnp.maximum(load_mean[-1], 1e-9))
        dropped.append(jnp.zeros((), jnp.float32) if routing.dropped is None
                       else routing.dropped.astype(jnp.float32) / (M * top_k))
    tokens_per_expert = assign_total / n_assign
    prob_per_expert = jnp.zeros((num_experts,), jnp.float32).at[: nk * nk].set(prob_total.reshape(-1) / n_tokens)
    mean = lambda xs: jnp.mean(jnp.stack(xs))  # noqa: E731
    return RoutingSummary(
        aux_loss=jnp.sum(tokens_per_expert * prob_per_expert) * num_experts,
        z_loss=z_total / len(routings),
        stats={"experts_used": mean(used), "load_max": mean(load_max), "load_mean": mean(load_mean),
               "load_max_over_mean": mean(ratio), "dropped_fraction": mean(dropped)})


def routing_from_scores(scores: jax.Array, num_keys: int, top_k: int) -> Routing:
    """A `Routing` for router scores [2, M, nk] computed elsewhere (e.g. transformers' router logits in a test)."""
    return Routing(scores=scores, indices=select_experts(scores, num_keys, top_k)[1])
