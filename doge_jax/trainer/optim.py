"""AdamW with global-norm clipping and the Warmup-Stable-Decay (WSD) learning-rate schedule.

    lr(s) = peak · (s + 1) / warmup                       s < warmup
          = peak                                          warmup ≤ s < decay_start
          = peak · decay(p),  p = (s − decay_start + 1) / decay_steps      s ≥ decay_start = total − decay_steps

decay(p) goes from 1 to min_lr_ratio: linear, cosine, or 1 − sqrt (MiniCPM's WSD). Nothing before
`decay_start` depends on `total_steps`, so a decay can branch off any stable-phase checkpoint: resume it with
`total_steps = S + D` and `decay_steps = D` and the first S steps are exactly the run that wrote it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

DECAY_TYPES = ("linear", "cosine", "1-sqrt")


def decay_steps(config) -> int:
    """config.schedule.decay_steps, or decay_fraction of total_steps when it is −1."""
    sched = config.schedule
    if sched.decay_steps >= 0:
        return int(sched.decay_steps)
    return int(round(sched.decay_fraction * config.total_steps))


def wsd_schedule(peak_lr: float, *, total_steps: int, warmup_steps: int, decay_steps: int,
                 min_lr_ratio: float = 0.0, decay_type: str = "linear") -> Callable[[jax.Array], jax.Array]:
    """step (int, 0-based update index) → learning rate (float32)."""
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"config.schedule.decay_type={decay_type!r} must be one of {list(DECAY_TYPES)}")
    decay_start = total_steps - decay_steps

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        lr = jnp.float32(peak_lr)
        if warmup_steps > 0:
            lr = lr * jnp.minimum(1.0, (s + 1.0) / warmup_steps)
        if decay_steps > 0:  # (a schedule without decay stays free of total_steps, also in the compiled step)
            p = jnp.clip((s - decay_start + 1.0) / decay_steps, 0.0, 1.0)
            if decay_type == "linear":
                shape = 1.0 - p
            elif decay_type == "cosine":
                shape = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
            else:
                shape = 1.0 - jnp.sqrt(p)
            lr = lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)
        return lr

    return schedule


def decay_mask(params):
    """Weight decay on matrices only: kernels and embeddings. Norm weights, the residual scales, biases and the
    DMA `A` are all vectors, so `ndim >= 2` is exactly the rule (tests/test_train_optim.py pins the names)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
    """(AdamW transformation, schedule) from config.optimizer / config.schedule."""
    opt = config.optimizer
    schedule = wsd_schedule(
        opt.lr, total_steps=config.total_steps, warmup_steps=config.schedule.warmup_steps,
        decay_steps=decay_steps(config), min_lr_ratio=config.schedule.min_lr_ratio,
        decay_type=config.schedule.decay_type)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw) if opt.clip_norm > 0 else adamw
    return tx, schedule
