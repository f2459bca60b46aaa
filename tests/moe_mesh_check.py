"""Expert-parallel CDMoE == the dense reference on 1, 2, 4 and 8 fake CPU devices. Run as a script (a fresh
process, so the device count can be set before jax is imported): `python tests/moe_mesh_check.py 1,2,4,8
[--train]` starts max(counts) fake devices and builds each mesh on the first n of them; the unsharded reference
is computed once.

For every (data, fsdp, tensor, expert) mesh of each device count listed in MESHES it checks, against the
unsharded reference (`moe_reference.experts_reference`, no mesh):
  layer  CDMoE output and the gradients of all its parameters and of its input;
         and that the compiled step never all-gathers a whole expert table;
  model  a tiny Doge-MoE's loss (CE + aux + z-loss) and the gradients of every parameter;
  auto   moe_impl="auto" under `jax.set_mesh` takes the expert-parallel path and agrees; "explicit" names
         moe_impl="expert_parallel" in the config.
  capacity  capacity-bounded dispatch (`capacity_factor` > 0, compacted slots): with room for every pair it
         equals the reference (output, gradients, dropped = 0); with capacity_factor = 1 it drops pairs and
         equals a plain-numpy reference that zeroes exactly the pairs past each shard's capacity, in (token,
         rank) order, with the same dropped count; and a tiny model with a capacity reports
         moe/dropped_fraction = dropped / (tokens · top_k).
With --train, configs/doge_tiny_moe.py and configs/doge_40m_moe.py (2 and 1 layers: more only cost compile
time) take a few AdamW steps under `jax.set_mesh` on a (data=2, expert=N/2) mesh, the way the trainer should
run them, reporting the routing statistics (`CausalLMOutput.moe.stats`) as metrics.
Prints one line per check and exits non-zero on the first mismatch.

Tolerances (fp32): outputs and loss 2e-5 absolute, gradients 2e-5 relative to the largest entry of each
reference gradient (observed ≤ 2e-6: the expert sum is only reassociated across shards).
"""

from __future__ import annotations

import os
import sys

COUNTS = [int(c) for c in sys.argv[1].split(",")]
N = max(COUNTS)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={N}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402

from doge_jax.model import loss as loss_lib  # noqa: E402
from doge_jax.model import decoder as model_lib  # noqa: E402
from doge_jax.model import moe as moe_block  # noqa: E402
from doge_jax.model import moe_reference as moe  # noqa: E402
from doge_jax.parallel import experts as ep  # noqa: E402
from doge_jax.parallel import sharding as sh  # noqa: E402
from doge_jax.model.config import DogeConfig  # noqa: E402

ATOL = 2e-5
GRAD_RTOL = 2e-5

# (data, fsdp, tensor, expert) per device count: expert alone, with fsdp, with tensor (MODEL_MESHES adds data).
MESHES = {
    1: [(1, 1, 1, 1)],
    2: [(1, 1, 1, 2)],
    4: [(1, 2, 1, 2)],
    8: [(1, 1, 1, 8), (1, 1, 2, 4)],
}
# The model check (slower to compile): per device count, (mesh, how the expert-parallel path is switched on).
MODEL_MESHES = {
    1: [((1, 1, 1, 1), "explicit")],
    2: [((1, 1, 1, 2), "auto")],
    4: [((2, 1, 1, 2), "explicit")],
    8: [((1, 2, 1, 4), "auto"), ((2, 1, 1, 4), "explicit")],
}

LAYER_CFG = DogeConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2, is_moe=True, num_experts=64, num_experts_per_tok=8,
                       initializer_range=0.2)  # a large init so the expert term is not negligible
MODEL_CFG = DogeConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       keep_window_size=8, is_moe=True, num_experts=64, num_experts_per_tok=6,
                       initializer_range=0.1, router_z_loss_coef=1e-3, router_aux_loss_coef=0.01)


def make_mesh(shape):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, sh.MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=jax.devices()[:n])


_T0 = time.perf_counter()


def stamp():
    return f"[{time.perf_counter() - _T0:.1f}s]"


def fail(msg):
    print("FAIL", msg, flush=True)
    sys.exit(1)


def compare_tree(name, got, want):
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_want = jax.tree.leaves(want)
    if len(flat_got) != len(flat_want):
        fail(f"{name}: {len(flat_got)} gradient leaves, reference has {len(flat_want)}")
    worst = 0.0
    for (path, g), w in zip(flat_got, flat_want):
        g, w = np.asarray(g), np.asarray(w)
        scale = max(float(np.abs(w).max()), 1e-6)
        err = float(np.abs(g - w).max()) / scale
        worst = max(worst, err)
        if err > GRAD_RTOL:
            fail(f"{name}: gradient {jax.tree_util.keystr(path)} rel err {err:.2e} > {GRAD_RTOL}")
    return worst


def shard_params(params, mesh):
    return jax.device_put(params, sh.state_shardings(params, mesh))


# --- the CDMoE layer --------------------------------------------------------------------------------------------

def layer_loss(graphdef, params, h):
    layer = nnx.merge(graphdef, params)
    block = layer(h)
    out, scores = block.out, block.routing.scores
    # A loss that weighs every output entry differently, plus the router scores so routing gets gradients.
    w = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out * w) + 0.1 * jnp.sum(jnp.tanh(scores)), out


def check_layer():
    """Under `jax.set_mesh`, with moe_impl="auto" (expert-parallel when the mesh has an expert axis > 1)."""
    layer = moe_block.CDMoE(LAYER_CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    h = jax.random.normal(jax.random.key(1), (8, 6, LAYER_CFG.hidden_size))  # [B, T, D]; B·T = 48 ≠ E = 64
    grad_fn = jax.value_and_grad(lambda p, x: layer_loss(graphdef, p, x), argnums=(0, 1), has_aux=True)
    (ref_loss, ref_out), ref_grads = jax.jit(grad_fn)(params, h)

    E, D = LAYER_CFG.num_experts, LAYER_CFG.hidden_size
    whole_table_gather = re.compile(rf"f32\[{E},{D}\][^\n]* all-gather\(")
    routing_gather = re.compile(r"all-gather\([^\n]*top_k")
    for shape in [s for c in COUNTS for s in MESHES[c]]:
        mesh = make_mesh(shape)
        p_sh = shard_params(params, mesh)
        h_sh = jax.device_put(h, NamedSharding(mesh, sh.logical_to_spec((sh.BATCH, None, None))))
        with jax.set_mesh(mesh):
            step = jax.jit(grad_fn)
            hlo = step.lower(p_sh, h_sh).compile().as_text()
            (loss, out), grads = step(p_sh, h_sh)
        if shape[3] > 1 and "shard_map" not in hlo:
            fail(f"layer {shape}: moe_impl='auto' did not take the expert-parallel path")
        if whole_table_gather.search(hlo):
            fail(f"layer {shape}: the compiled step all-gathers a whole [{E}, {D}] expert table")
        if routing_gather.search(hlo):
            fail(f"layer {shape}: the compiled step all-gathers router scores for top_k")
        out_err = float(np.abs(np.asarray(out) - np.asarray(ref_out)).max())
        if out_err > ATOL or abs(float(loss) - float(ref_loss)) > ATOL * max(1.0, abs(float(ref_loss))):
            fail(f"layer {shape}: output err {out_err:.2e}, loss {float(loss)} vs {float(ref_loss)}")
        g_err = compare_tree(f"layer {shape}", grads, ref_grads)
        print(f"ok layer mesh={shape} out_err={out_err:.1e} grad_rel_err={g_err:.1e} "
              f"up_embed_grad_sharding={grads[0]['up_embed'].sharding.spec} {stamp()}", flush=True)


# --- a tiny Doge MoE model --------------------------------------------------------------------------------------

def model_loss(graphdef, rest, params, ids, mask):
    m = nnx.merge(graphdef, params, rest)
    out = m(ids, mask)
    cfg = m.cfg
    labels = jnp.where(mask > 0, ids, loss_lib.IGNORE_INDEX)
    value = loss_lib.causal_lm_loss(out.logits, labels)
    value += cfg.router_aux_loss_coef * out.aux_loss
    value += cfg.router_z_loss_coef * out.moe.z_loss
    return value


def model_inputs(cfg, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, length)), jnp.int32)
    mask = np.ones((batch, length), np.int32)
    mask[0, -3:] = 0  # some padding, so the aux loss / stats see a token mask
    return ids, jnp.asarray(mask)


def check_model():
    model = model_lib.build(MODEL_CFG, seed=3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids, mask = model_inputs(MODEL_CFG, 8, 12)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: model_loss(graphdef, rest, p, ids, mask)))(params)
    for shape, how in [m for c in COUNTS for m in MODEL_MESHES[c]]:
        mesh = make_mesh(shape)
        batch = NamedSharding(mesh, sh.logical_to_spec((sh.BATCH, None)))
        ids_sh, mask_sh = jax.device_put(ids, batch), jax.device_put(mask, batch)
        p_sh = shard_params(params, mesh)
        if how == "auto":  # moe_impl="auto": expert-parallel chosen from the mesh
            g, r = graphdef, rest
        else:  # moe_impl="expert_parallel", named explicitly in the config
            ep_model = model_lib.build(MODEL_CFG.replace(moe_impl="expert_parallel"), seed=3)
            g, _, r = nnx.split(ep_model, nnx.Param, ...)
        with jax.set_mesh(mesh):
            loss, grads = jax.jit(jax.value_and_grad(lambda p: model_loss(g, r, p, ids_sh, mask_sh)))(p_sh)
        if abs(float(loss) - float(ref_loss)) > ATOL:
            fail(f"model {shape} {how}: loss {float(loss)} vs reference {float(ref_loss)}")
        g_err = compare_tree(f"model {shape} {how}", grads, ref_grads)
        print(f"ok model mesh={shape} {how} loss_err={abs(float(loss) - float(ref_loss)):.1e} "
              f"grad_rel_err={g_err:.1e} {stamp()}", flush=True)


# --- capacity-bounded dispatch ------------------------------------------------------------------------------------

def capacity_keep(indices, n, groups, slots):
    """Plain numpy: 1 for the pairs the capacity-bounded dispatch keeps, 0 for those it drops ([M, k] float32).

    Tokens are split into `groups` contiguous data/fsdp groups; within a group, expert shard s owns the pairs
    with expert // (E/n) == s and keeps the first `slots` of them in (token, rank) order."""
    idx = np.asarray(indices)
    M, k = idx.shape
    e_local = LAYER_CFG.num_experts // n
    keep = np.ones(M * k, np.float32)
    for g in range(groups):
        lo, hi = g * M // groups * k, (g + 1) * M // groups * k
        owner = idx.reshape(-1)[lo:hi] // e_local
        for s in range(n):
            keep[lo + np.flatnonzero(owner == s)[slots:]] = 0.0
    return keep.reshape(M, k)


def check_capacity():
    E, D, k = LAYER_CFG.num_experts, LAYER_CFG.hidden_size, LAYER_CFG.num_experts_per_tok
    M = 48
    keys = jax.random.split(jax.random.key(7), 5)
    h = jax.random.normal(keys[0], (M, D))
    indices = jax.random.randint(keys[1], (M, k), 0, E)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (M, k)), axis=-1)
    down, up = jax.random.normal(keys[3], (E, D)), jax.random.normal(keys[4], (E, D))
    proj = jnp.sin(jnp.arange(M * D, dtype=jnp.float32)).reshape(M, D)  # weighs every output entry differently

    def ref_loss(h, w, d, u, keep):
        out = moe.experts_reference(h, indices, w * keep, d, u, jax.nn.silu)
        return jnp.sum(out * proj), out

    for shape in [s for c in COUNTS for s in MESHES[c]]:
        mesh = make_mesh(shape)
        n, groups = shape[3], shape[0] * shape[1]
        tok = NamedSharding(mesh, sh.logical_to_spec((sh.BATCH, None)))
        tab = NamedSharding(mesh, sh.logical_to_spec((sh.EXPERTS, sh.EMBED)))
        args = (jax.device_put(h, tok), jax.device_put(weights, tok), jax.device_put(down, tab),
                jax.device_put(up, tab))
        # 1.5: compacted (fewer slots than pairs) for n >= 2, yet room for every pair of these inputs.
        for cf in (1.5, 1.0):
            slots = ep.capacity(M // groups * k, n, cf)
            if n > 1 and slots is None:
                fail(f"capacity {shape} cf={cf}: expected a compacted dispatch")
            keep = capacity_keep(indices, n, groups, M * k if slots is None else slots)
            want_dropped = int((keep == 0).sum())
            if cf == 1.5 and want_dropped:
                fail(f"capacity {shape}: the no-drop inputs drop {want_dropped} pairs; pick other inputs")

            def loss(h, w, d, u, cf=cf):
                out, dropped = ep.expert_parallel_experts(h, jax.device_put(indices, tok), w, d, u, jax.nn.silu,
                                                          capacity_factor=cf)
                return jnp.sum(out * proj), (out, dropped)

            with jax.set_mesh(mesh):
                (_, (out, dropped)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3),
                                                                        has_aux=True))(*args)
            (_, ref_out), ref_grads = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2, 3), has_aux=True))(
                h, weights, down, up, jnp.asarray(keep))
            out_err = float(np.abs(np.asarray(out) - np.asarray(ref_out)).max())
            if out_err > ATOL or int(dropped) != want_dropped:
                fail(f"capacity {shape} cf={cf}: output err {out_err:.2e}, dropped {int(dropped)} vs "
                     f"{want_dropped}")
            g_err = compare_tree(f"capacity {shape} cf={cf}", grads, ref_grads)
            print(f"ok capacity mesh={shape} cf={cf} slots={slots} dropped={int(dropped)}/{M * k} "
                  f"out_err={out_err:.1e} grad_rel_err={g_err:.1e} {stamp()}", flush=True)


def check_capacity_model():
    """The model with a capacity on the largest mesh: equal to the reference without drops, and the
    dropped fraction in the routing statistics."""
    shape = MODEL_MESHES[N][0][0]
    mesh = make_mesh(shape)
    ids, mask = model_inputs(MODEL_CFG, 8, 12)
    batch = NamedSharding(mesh, sh.logical_to_spec((sh.BATCH, None)))
    ids_sh, mask_sh = jax.device_put(ids, batch), jax.device_put(mask, batch)
    model = model_lib.build(MODEL_CFG, seed=3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: model_loss(graphdef, rest, p, ids, mask)))(params)
    p_sh = shard_params(params, mesh)
    for cf in (2.0, 1.0):  # 2.0: compacted (144 slots for 288 pairs per group and shard), nothing dropped
        g, _, r = nnx.split(model_lib.build(MODEL_CFG.replace(moe_impl="expert_parallel", capacity_factor=cf),
                                            seed=3), nnx.Param, ...)

        def loss(p, g=g, r=r):
            out = nnx.merge(g, p, r)(ids_sh, mask_sh)
            return model_loss(g, r, p, ids_sh, mask_sh), (out.moe.stats["dropped_fraction"], out.routing[0].dropped)

        with jax.set_mesh(mesh):
            (value, (frac, dropped)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p_sh)
        pairs = ids.size * MODEL_CFG.num_experts_per_tok
        if abs(float(frac) - int(dropped) / pairs) > 1e-7:
            fail(f"capacity model cf={cf}: dropped_fraction {float(frac)} but {int(dropped)} of {pairs} dropped")
        if cf == 2.0:
            if int(dropped) or abs(float(value) - float(ref_loss)) > ATOL:
                fail(f"capacity model cf={cf}: dropped {int(dropped)}, loss {float(value)} vs {float(ref_loss)}")
            compare_tree(f"capacity model cf={cf}", grads, ref_grads)
        elif not int(dropped):
            fail(f"capacity model cf={cf}: expected drops at capacity_factor 1 on {shape}")
        print(f"ok capacity model mesh={shape} cf={cf} loss={float(value):.5f} (reference {float(ref_loss):.5f}) "
              f"dropped_fraction={float(frac):.3f} {stamp()}", flush=True)


# --- a few training steps on an expert-sharded mesh ---------------------------------------------------------------

def train_few_steps(config_module, mesh_shape, *, steps, batch, length, **overrides):
    import importlib

    import optax

    cfg_dict = importlib.import_module(f"configs.{config_module}").get_config().model.to_dict()
    cfg = DogeConfig.from_dict({**cfg_dict, **overrides})
    mesh = make_mesh(mesh_shape)
    model = nnx.eval_shape(lambda: model_lib.build(cfg))
    graphdef, abs_params, rest = nnx.split(model, nnx.Param, ...)
    p_shard = sh.state_shardings(abs_params, mesh)
    params = jax.jit(lambda: nnx.split(model_lib.build(cfg), nnx.Param, ...)[1], out_shardings=p_shard)()
    rest = jax.tree.map(lambda x: jax.random.key(0) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                        else jnp.zeros(x.shape, x.dtype), rest)
    tx = optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.01)
    opt_state = jax.jit(tx.init)(params)
    batch_sh = NamedSharding(mesh, sh.logical_to_spec((sh.BATCH, None)))
    ids, mask = model_inputs(cfg, batch, length, seed=1)
    ids, mask = jax.device_put(ids, batch_sh), jax.device_put(mask, batch_sh)

    def step(params, opt_state, ids, mask):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            out = m(ids, mask)
            labels = jnp.where(mask > 0, ids, loss_lib.IGNORE_INDEX)
            ce = loss_lib.causal_lm_loss(out.logits, labels)
            return ce + cfg.router_aux_loss_coef * out.aux_loss, out.moe.stats

        (value, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": value, **{f"moe/{k}": v for k, v in stats.items()}}

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # moe_impl='auto' takes the expert-parallel path on this mesh
        jitted = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, ids, mask).compile()
    if "shard_map" not in jitted.as_text():
        fail(f"train {config_module}: the step does not use the expert-parallel shard_map")
    losses = []
    for _ in range(steps):
        params, opt_state, metrics = jitted(params, opt_state, ids, mask)
        losses.append(float(metrics["loss"]))
    if not all(np.isfinite(losses)) or not losses[-1] < losses[0]:
        fail(f"train {config_module} mesh={mesh_shape}: losses {losses} (expected finite and decreasing)")
    spec = params["layers"][0]["mlp"]["up_embed"].sharding.spec
    if "expert" not in str(spec):
        fail(f"train {config_module}: up_embed sharded as {spec}, expected over 'expert'")
    print(f"ok train {config_module} mesh={mesh_shape} losses={[round(x, 4) for x in losses]} "
          f"up_embed={spec} " + " ".join(f"{k}={float(v):.3g}" for k, v in metrics.items() if k != "loss")
          + f" ({time.perf_counter() - t0:.1f}s)", flush=True)


def main():
    check_layer()
    check_model()
    check_capacity()
    check_capacity_model()
    if "--train" in sys.argv:
        shape = (2, 1, 1, N // 2) if N >= 4 else (1, 1, 1, N)
        train_few_steps("doge_tiny_moe", shape, steps=4, batch=16, length=32, num_hidden_layers=2)
        train_few_steps("doge_40m_moe", shape, steps=2, batch=8, length=8, num_hidden_layers=1)
    print(f"done devices={COUNTS} {stamp()}", flush=True)


if __name__ == "__main__":
    main()
