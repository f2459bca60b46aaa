"""AdamW + WSD: schedule shapes, decay branching, and which parameters get weight decay."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from doge_jax import DogeConfig
from doge_jax.model import decoder as model_lib
from doge_jax.trainer import make_optimizer, wsd_schedule
from doge_jax.trainer.optim import decay_mask

PEAK = 1e-2


def _lrs(schedule, n):
    return np.asarray([float(schedule(s)) for s in range(n)])


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
def test_wsd_phases(decay_type):
    sched = wsd_schedule(PEAK, total_steps=100, warmup_steps=10, decay_steps=20, min_lr_ratio=0.1,
                         decay_type=decay_type)
    lr = _lrs(sched, 100)
    np.testing.assert_allclose(lr[:10], PEAK * np.arange(1, 11) / 10, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(lr[10:80], PEAK, rtol=1e-6)  # stable
    assert np.all(np.diff(lr[80:]) < 0)  # strictly decaying ...
    np.testing.assert_allclose(lr[99], 0.1 * PEAK, rtol=1e-5)  # ... to min_lr_ratio at the last update
    p = (np.arange(80, 100) - 80 + 1) / 20
    shape = {"linear": 1 - p, "cosine": 0.5 * (1 + np.cos(np.pi * p)), "1-sqrt": 1 - np.sqrt(p)}[decay_type]
    np.testing.assert_allclose(lr[80:], PEAK * (0.1 + 0.9 * shape), rtol=1e-5)


def test_decay_branches_off_any_stable_step():
    """A stable run to 1000 steps and a decay branched at step 600 agree exactly before the branch."""
    stable = wsd_schedule(PEAK, total_steps=1000, warmup_steps=50, decay_steps=0)
    branch = wsd_schedule(PEAK, total_steps=700, warmup_steps=50, decay_steps=100)
    np.testing.assert_array_equal(_lrs(stable, 600), _lrs(branch, 600))
    assert float(branch(699)) == 0.0 and float(stable(999)) == np.float32(PEAK)


def test_weight_decay_only_on_matrices():
    cfg = DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, attention_bias=True, mlp_bias=True)
    params = nnx.to_pure_dict(nnx.state(model_lib.abstract_model(cfg), nnx.Param))
    names = {"/".join(str(getattr(k, "key", k)) for k in path): v
             for path, v in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    no_decay = sorted(n for n, v in names.items() if not v)
    decay = sorted(n for n, v in names.items() if v)
    assert all(n.endswith(("weight", "residual", "/A", "bias")) for n in no_decay), no_decay
    assert any(n.endswith("/A") for n in no_decay) and any(n.endswith("bias") for n in no_decay)
    assert any("norm" in n for n in no_decay) and any(n.endswith("residual") for n in no_decay)
    assert all(n.endswith("kernel") or n == "embed_tokens" for n in decay), decay


def test_adamw_hyperparameters_and_masked_decay():
    config = ml_collections.ConfigDict(dict(
        total_steps=10, optimizer=dict(lr=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.5, clip_norm=1.0),
        schedule=dict(warmup_steps=0, decay_steps=0, decay_fraction=0.0, min_lr_ratio=0.0, decay_type="linear")))
    tx, schedule = make_optimizer(config)
    params = {"kernel": jnp.ones((2, 2)), "norm": {"weight": jnp.ones((2,))}}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradients: only decoupled weight decay moves the matrix (by lr · wd), never the vector.
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["norm"]["weight"], np.zeros(2))
    # Clipping at global norm 1: a gradient of norm 10 gives Adam's first step ≈ lr · sign.
    big = {"kernel": jnp.full((2, 2), 5.0), "norm": {"weight": jnp.zeros((2,))}}
    updates, _ = tx.update(big, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * (1.0 + 0.5), rtol=1e-4)
