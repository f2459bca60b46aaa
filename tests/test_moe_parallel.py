"""Expert-parallel CDMoE (doge_jax.parallel.experts) and the routing statistics.

The mesh checks need fake CPU devices, which must be requested before jax is imported, and pytest has imported
jax already: they run in a subprocess (tests/moe_mesh_check.py, 8 devices, meshes of 1, 2, 4 and 8 of them).
Tolerances are written out there; here: 1e-6 absolute on O(1) outputs (fp32, reassociated sums).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from doge_jax.model import moe_reference as moe
from doge_jax.parallel import experts as moe_parallel
from doge_jax.parallel import sharding as sh
from doge_jax.model.config import DogeConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def _routing_inputs(M=40, D=16, E=64, k=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(keys[0], (M, D))
    indices = jax.random.randint(keys[1], (M, k), 0, E)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (M, k)), axis=-1)
    down, up = jax.random.normal(keys[3], (E, D)), jax.random.normal(keys[4], (E, D))
    return h, indices, weights, down, up


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_local_experts_over_a_partition_sum_to_reference(n):
    h, indices, weights, down, up = _routing_inputs()
    ref = moe.experts_reference(h, indices, weights, down, up, jax.nn.silu)
    e = down.shape[0] // n
    total = sum(moe_parallel.local_experts(h, indices, weights, down[s * e:(s + 1) * e], up[s * e:(s + 1) * e],
                                           jax.nn.silu, s * e) for s in range(n))
    np.testing.assert_allclose(np.asarray(total), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_local_experts_gradient_stays_in_the_local_block():
    h, indices, weights, down, up = _routing_inputs()
    e = 16
    grads = jax.grad(lambda d, u: jnp.sum(moe_parallel.local_experts(h, indices, weights, d, u, jax.nn.silu, e)),
                     argnums=(0, 1))(down[e:2 * e], up[e:2 * e])
    full = jax.grad(lambda u: jnp.sum(moe.experts_reference(h, indices, weights, down, u, jax.nn.silu)))(up)
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(full[e:2 * e]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slots", [8, 24, 40])
def test_compacted_slots_equal_the_reference_on_the_kept_pairs(slots):
    """One shard's compacted dispatch (experts [16, 32) of 64) == the masked reference with the pairs past
    `slots` (in (token, rank) order) zeroed, forward and every gradient; the dropped count matches."""
    h, indices, weights, down, up = _routing_inputs()
    first, e_local = 16, 16
    owned = np.flatnonzero(((np.asarray(indices) >= first) & (np.asarray(indices) < first + e_local)).reshape(-1))
    keep = np.ones(indices.size, np.float32)
    keep[owned[slots:]] = 0.0
    keep = jnp.asarray(keep.reshape(indices.shape))
    d_local, u_local = down[first:first + e_local], up[first:first + e_local]

    def slotted(h, w, d, u):
        pair, token, expert, valid, dropped = moe_parallel.compact_pairs(indices, first, e_local, slots)
        return moe_parallel.slot_experts(h, pair, token, expert, valid, w, d, u, jax.nn.silu), dropped

    def masked(h, w, d, u):
        return moe_parallel.local_experts(h, indices, w * keep, d, u, jax.nn.silu, first), None

    proj = jax.random.normal(jax.random.key(3), h.shape)
    (_, (_, dropped)), grads = jax.value_and_grad(lambda *a: (jnp.sum(slotted(*a)[0] * proj), slotted(*a)),
                                                  argnums=(0, 1, 2, 3), has_aux=True)(h, weights, d_local, u_local)
    (_, _), ref_grads = jax.value_and_grad(lambda *a: (jnp.sum(masked(*a)[0] * proj), None), argnums=(0, 1, 2, 3),
                                           has_aux=True)(h, weights, d_local, u_local)
    np.testing.assert_allclose(np.asarray(slotted(h, weights, d_local, u_local)[0]),
                               np.asarray(masked(h, weights, d_local, u_local)[0]), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)
    assert int(dropped) == max(len(owned) - slots, 0)


def test_capacity_slots():
    assert moe_parallel.capacity(384, 8, 0.0) is None  # 0: the exact masked path
    assert moe_parallel.capacity(384, 1, 1.25) is None  # one shard: the slots would hold every pair
    assert moe_parallel.capacity(384, 8, 1.25) == 64  # ceil(1.25 · 48) = 60 → a multiple of 8
    assert moe_parallel.capacity(2048 * 64, 8, 1.25) == 20480
    with pytest.raises(ValueError, match=r"^capacity_factor=0.5 must be 0 \(no dropping\) or >= 1"):
        DogeConfig(capacity_factor=0.5)


def test_expert_axis_must_divide_num_experts():
    h, indices, weights, down, up = _routing_inputs(E=64)
    mesh = jax.sharding.AbstractMesh((1, 1, 1, 3), sh.MESH_AXES)
    with pytest.raises(ValueError, match=r"num_experts=64 must be a multiple of the 'expert' mesh axis size 3"):
        moe_parallel.expert_parallel_experts(h, indices, weights, down, up, jax.nn.silu, mesh=mesh)
    assert moe_parallel.expert_axis_size(mesh) == 3
    assert moe_parallel.expert_axis_size(jax.sharding.get_abstract_mesh()) == 1


def test_moe_impl_is_chosen_from_the_config_and_mesh():
    from doge_jax.model import moe as moe_block

    no_mesh = jax.sharding.get_abstract_mesh()
    expert4 = jax.sharding.AbstractMesh((1, 1, 1, 4), sh.MESH_AXES)
    data4 = jax.sharding.AbstractMesh((4, 1, 1, 1), sh.MESH_AXES)
    assert moe_block.experts_impl("auto", no_mesh) == "reference"
    assert moe_block.experts_impl("auto", data4) == "reference"
    assert moe_block.experts_impl("auto", expert4) == "expert_parallel"
    assert moe_block.experts_impl("reference", expert4) == "reference"
    assert moe_block.experts_impl("expert_parallel", data4) == "expert_parallel"
    with pytest.raises(ValueError, match=r"^moe_impl='expert_parallel' needs a device mesh"):
        moe_block.experts_impl("expert_parallel", no_mesh)
    cfg = DogeConfig(vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                     num_attention_heads=2, is_moe=True, num_experts=16, num_experts_per_tok=3)
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    out = moe_block.CDMoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))(x)
    ref = moe_block.CDMoE(cfg.replace(moe_impl="reference"), dtype=jnp.float32, rngs=nnx.Rngs(0))(x)
    np.testing.assert_array_equal(np.asarray(out.out), np.asarray(ref.out))
    assert out.routing.indices.shape == (6, 3)


def test_routing_stats_counts_assignments():
    # num_keys = 2 (4 experts), top-1. x/y scores pick (x, y) → expert 2x + y.
    big, small = 5.0, 0.0
    sx = jnp.array([[big, small], [big, small], [small, big]])  # tokens pick x = 0, 0, 1
    sy = jnp.array([[big, small], [big, small], [small, big]])  # and y = 0, 0, 1 → experts 0, 0, 3
    scores = jnp.stack([sx, sy])  # [2, M=3, nk=2]
    stats = moe.routing_summary([moe.routing_from_scores(scores, 2, 1)], num_experts=4).stats
    assert {k: round(float(v), 4) for k, v in stats.items()} == {
        "experts_used": 0.5, "load_max": 2.0, "load_mean": 0.75, "load_max_over_mean": round(2 / 0.75, 4),
        "dropped_fraction": 0.0}
    routing = moe.routing_from_scores(scores, 2, 1)
    masked = moe.routing_summary([routing, routing], 4, token_mask=jnp.array([1, 1, 0])).stats  # layers averaged
    assert {k: round(float(v), 4) for k, v in masked.items()} == {
        "experts_used": 0.25, "load_max": 2.0, "load_mean": 0.5, "load_max_over_mean": 4.0, "dropped_fraction": 0.0}
    dropped = moe.Routing(scores=routing.scores, indices=routing.indices, dropped=jnp.int32(1))  # 1 of 3 pairs
    frac = moe.routing_summary([dropped, routing], 4).stats["dropped_fraction"]
    np.testing.assert_allclose(float(frac), (1 / 3 + 0) / 2, rtol=1e-6)


@pytest.mark.parametrize("name", ["doge_tiny_moe", "doge_40m_moe"])
def test_moe_configs_shard_over_eight_expert_devices(name):
    import importlib

    from doge_jax.model import decoder as model_lib

    cfg = DogeConfig.from_dict(importlib.import_module(f"configs.{name}").get_config().model.to_dict())
    assert cfg.is_moe and cfg.num_keys ** 2 == cfg.num_experts and cfg.num_experts % 8 == 0
    model_lib.abstract_model(cfg)  # builds without allocating


def test_expert_parallel_matches_reference_on_fake_devices():
    """Layer and tiny-model outputs and gradients on meshes of 1, 2, 4 and 8 devices, and a few training steps
    of configs/doge_tiny_moe.py and configs/doge_40m_moe.py on a (data=2, expert=4) mesh."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.dirname(HERE)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "moe_mesh_check.py"), "1,2,4,8", "--train"],
                          env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done devices=[1, 2, 4, 8]" in proc.stdout
