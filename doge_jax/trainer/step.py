"""The one jitted train step, the eval step, and the pretraining loss.

A loss function is the only thing a training stage supplies:

    loss_fn(model, batch, rng, **frozen) -> (loss, metrics)

`batch` is one micro-batch (dict of arrays [M, ...]), `rng` a fresh key per micro-batch and step, `loss` a
scalar mean over the micro-batch and `metrics` a dict of scalars. If `metrics["weight"]` is present (e.g. the
number of target tokens), micro-batches are combined weighted by it, so gradient accumulation gives exactly
the gradient of the whole batch's token mean; otherwise every micro-batch weighs 1.

`frozen`: models the loss reads but does not train (the DPO / GRPO reference), one keyword each, in eval mode.
Their parameters are an argument of the jitted step (`frozen_params`, sharded like the policy's by the
Trainer), never constants baked into the compiled program; no gradient is taken with respect to them.

The train state is a dict of arrays: params (the NNX Param state as a pure dict, float32 master weights),
opt_state (optax), step (int32, updates done) and rng (raw key data of the run's base key).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from doge_jax.model.token_scores import cross_entropy_sums, token_scores

LossFn = Callable[..., tuple[jax.Array, dict]]  # (model, batch, rng, **frozen models) -> (loss, metrics)
FrozenDefs = dict[str, tuple[Any, Any]]  # loss_fn keyword -> (graphdef, non-Param state) of a frozen model
WEIGHT = "weight"


def pretrain_loss(model, batch: dict, rng: jax.Array, *, z_loss_coef: float = 0.0,
                  loss_chunk_tokens: int = 0) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy over packed rows (+ optional logit z-loss, MoE load-balancing and router z-loss).

    batch: input_ids, targets (−100 = no loss), segment_ids (0 = padding), positions, each int32 [M, T].
    The head runs over chunks of `loss_chunk_tokens` tokens (doge_jax.model.token_scores: 0 = about 2^26 logits
    per chunk, -1 = all at once), so the [M, T, V] logits are never held."""
    del rng  # dropout, when configured, draws from the model's own streams (reseeded per step)
    cfg = model.cfg
    out = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"], head=False)
    scores = token_scores(model, out.hidden, batch["targets"], chunk_tokens=loss_chunk_tokens)
    nll_sum, count, lse_sq_sum = cross_entropy_sums(scores, batch["targets"])
    n = jnp.maximum(count, 1).astype(jnp.float32)
    ce = nll_sum / n
    loss = ce
    metrics = {"ce_loss": ce, WEIGHT: count.astype(jnp.float32)}
    if z_loss_coef > 0:
        metrics["z_loss"] = lse_sq_sum / n
        loss = loss + z_loss_coef * metrics["z_loss"]
    if out.moe is not None:  # aux loss, z-loss and statistics over the real tokens (segment_ids > 0)
        metrics["aux_loss"] = out.moe.aux_loss
        loss = loss + cfg.router_aux_loss_coef * out.moe.aux_loss
        if cfg.router_z_loss_coef > 0:
            metrics["router_z_loss"] = out.moe.z_loss
            loss = loss + cfg.router_z_loss_coef * out.moe.z_loss
        metrics.update({f"moe/{k}": v for k, v in out.moe.stats.items()})
    return loss, metrics


def _model(graphdef, params, rest, rng=None):
    model = nnx.merge(graphdef, params, rest)
    if rng is not None and jax.tree.leaves(rest):
        nnx.reseed(model, dropout=rng)  # dropout masks: a function of (seed, step, micro-batch) only
    return model


def _weighted(loss_fn: LossFn, graphdef, rest, frozen: FrozenDefs):
    """params, micro-batch, rng, frozen_params → (weight·loss, (loss, metrics, weight)): what we differentiate
    (with respect to params only)."""

    def f(params, batch, rng, frozen_params):
        models = {name: nnx.merge(g, frozen_params[name], r) for name, (g, r) in frozen.items()}
        loss, metrics = loss_fn(_model(graphdef, params, rest, rng), batch, rng, **models)
        metrics = dict(metrics)
        weight = jnp.asarray(metrics.pop(WEIGHT, 1.0), jnp.float32)
        return loss * weight, (loss, metrics, weight)

    return f


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, schedule: Callable, loss_fn: LossFn,
                    frozen: FrozenDefs | None = None):
    """The train step: state, batch (dict of [A, M, ...]: A micro-batches of M rows), frozen_params ({name:
    params} for `frozen`'s models; default none) → (new state, metrics).

    Gradients accumulate over the A micro-batches in a `lax.scan` (A = 1 is one micro-batch), then one
    clipped AdamW update. Metrics: loss and the loss_fn's metrics (weighted means over the batch), grad_norm
    (before clipping), lr (of this update), weight (the summed weights, e.g. target tokens)."""
    frozen = frozen or {}
    weighted_fn = _weighted(loss_fn, graphdef, rest, frozen)
    weighted = jax.value_and_grad(weighted_fn, has_aux=True)

    def train_step(state: dict, batch: dict, frozen_params: dict | None = None) -> tuple[dict, dict]:
        frozen_params = {} if frozen_params is None else frozen_params
        params, step = state["params"], state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        num_micro = jax.tree.leaves(batch)[0].shape[0]

        def micro(carry, xs):
            grads_sum, metrics_sum, weight_sum = carry
            mb, i = xs
            (_, (loss, metrics, weight)), grads = weighted(params, mb, jax.random.fold_in(key, i), frozen_params)
            metrics = {"loss": loss, **metrics}
            grads_sum = jax.tree.map(lambda a, g: a + g, grads_sum, grads)
            metrics_sum = jax.tree.map(lambda a, m: a + weight * m, metrics_sum, metrics)
            return (grads_sum, metrics_sum, weight_sum + weight), None

        first = jax.tree.map(lambda x: x[0], batch)
        _, (_, metrics_shape, _) = jax.eval_shape(weighted_fn, params, first, key, frozen_params)
        zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)  # noqa: E731
        init = (zeros(params), zeros({"loss": jax.ShapeDtypeStruct((), jnp.float32), **metrics_shape}),
                jnp.zeros((), jnp.float32))
        (grads, metrics, weight), _ = jax.lax.scan(micro, init, (batch, jnp.arange(num_micro)))
        denom = jnp.maximum(weight, 1e-9)
        grads = jax.tree.map(lambda g: g / denom, grads)
        metrics = jax.tree.map(lambda m: m / denom, metrics)

        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": step + 1,
                     "rng": state["rng"]}
        metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(step), weight=weight)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, rest, loss_fn: LossFn, frozen: FrozenDefs | None = None):
    """params, batch [M, ...], frozen_params → weighted sums {loss·w, metric·w, ..., weight}; the caller divides."""
    weighted = _weighted(loss_fn, graphdef, rest, frozen or {})

    def eval_step(params: dict, batch: dict, frozen_params: dict | None = None) -> dict[str, Any]:
        _, (loss, metrics, weight) = weighted(params, batch, jax.random.key(0),
                                              {} if frozen_params is None else frozen_params)
        sums = {k: weight * v for k, v in {"loss": loss, **metrics}.items()}
        sums[WEIGHT] = weight
        return sums

    return eval_step
