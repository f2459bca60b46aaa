"""CDMoE expert parallelism: per-shard work counted by the compiler, and (with --time) wall time and agreement.

    python benchmarks/bench_moe.py                   # FLOPs table: 8 fake CPU devices, compiles only (~minutes)
    python benchmarks/bench_moe.py --time            # + timings and max |EP − reference| at small shapes
    python benchmarks/bench_moe.py --time --tokens 16384 --dtype bfloat16   # on a GPU/TPU host

FLOPs table. For each shape (the 40M-MoE preset, configs/doge_40m_moe.py: hidden 256, ff 768, 1024 experts,
top-8; the 1.6B-MoE shape, DogeConfig's defaults with is_moe: hidden 1024, ff 2048, 16,384 experts, top-64) and
each expert-axis size n = 1, 2, 4, 8 (mesh (1, 1, 1, n): the same global batch of --group-tokens tokens, split n
ways as the trainer's BATCH rule does), it compiles forward + backward and reads `cost_analysis()["flops"]` of
the partitioned program, i.e. per device:
  experts     `expert_parallel_experts` alone (gradients for h, weights and both tables), exact path
              (capacity_factor = 0: every shard scans the whole group's pairs) and with --capacity-factor
  layer       the whole CDMoE layer (shared MLP + router + routing + experts), same two paths
  × ideal     per-shard experts FLOPs · n / (n = 1 FLOPs): 1.0 is perfect 1/n scaling; the exact path grows as n
Compiling needs no memory for activations, so the full shapes run on a laptop.

Timing table (--time): the shared MLP alone, the CDMoE reference on one device, and the expert-parallel CDMoE on
the mesh, with the max error of its output and gradients against the reference. On CPU fake devices the
"devices" share the host's cores, so those timings say nothing about collectives.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SHAPES = {  # name → DogeConfig fields
    "40M-MoE": dict(hidden_size=256, intermediate_size=768, num_experts=1024, num_experts_per_tok=8),
    "1.6B-MoE": dict(hidden_size=1024, intermediate_size=2048, num_experts=16384, num_experts_per_tok=64),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--expert-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--group-tokens", type=int, default=2048, help="global tokens per step in the FLOPs table")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--time", action="store_true", help="also time and check at --tokens/--hidden/--ffn")
    p.add_argument("--tokens", type=int, default=512, help="timing: tokens per step (batch × length)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cpu-devices", type=int, default=8, help="fake devices when running on CPU")
    p.add_argument("--iters", type=int, default=5)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu") and "xla_force_host_platform_device_count" not in \
            os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    print(f"# {jax.devices()[0].device_kind} × {jax.device_count()} ({_cpu_name()}), jax {jax.__version__}")
    flops_table(args)
    if args.time:
        timing_table(args)
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _mesh(n: int):
    import jax
    from jax.sharding import AxisType

    from doge_jax.parallel import sharding as sh

    return jax.make_mesh((1, 1, 1, n), sh.MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=jax.devices()[:n])


def _flops(fn, *args, mesh) -> float:
    """Per-device FLOPs of the compiled (partitioned) program."""
    import jax

    with jax.set_mesh(mesh):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def flops_table(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from doge_jax.model import moe
    from doge_jax.model.config import DogeConfig
    from doge_jax.parallel import experts as ep
    from doge_jax.parallel import sharding as sh

    M = args.group_tokens
    cf = args.capacity_factor
    print(f"\nPer-device GFLOPs, forward + backward, {M} tokens per step, mesh (1, 1, 1, n); capacity_factor={cf}")
    print("| shape | n | experts exact | experts capacity | × ideal exact | × ideal capacity | layer exact | "
          "layer capacity |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.shapes:
        cfg = DogeConfig(vocab_size=8, num_hidden_layers=1, num_attention_heads=1, is_moe=True, **SHAPES[name])
        E, D, k = cfg.num_experts, cfg.hidden_size, cfg.num_experts_per_tok
        state = nnx.split(nnx.eval_shape(lambda cfg=cfg: moe.CDMoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))))[1]
        base = {}
        for n in args.expert_sizes:
            mesh = _mesh(n)
            tok = NamedSharding(mesh, sh.logical_to_spec((sh.BATCH, None)))
            tab = NamedSharding(mesh, sh.logical_to_spec((sh.EXPERTS, sh.EMBED)))
            sds = jax.ShapeDtypeStruct
            h, w = sds((M, D), jnp.float32, sharding=tok), sds((M, k), jnp.float32, sharding=tok)
            idx = sds((M, k), jnp.int32, sharding=tok)
            table = sds((E, D), jnp.float32, sharding=tab)
            params = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state),
                                  nnx.to_pure_dict(sh.state_shardings(state, mesh)))
            x = sds((M // 8, 8, D), jnp.float32, sharding=NamedSharding(mesh, sh.logical_to_spec((sh.BATCH, None,
                                                                                                   None))))
            row = {}
            for path, c in (("exact", 0.0), ("capacity", cf)):
                def experts_loss(h, w, d, u, idx, c=c):
                    out, _ = ep.expert_parallel_experts(h, idx, w, d, u, jax.nn.silu, capacity_factor=c)
                    return jnp.sum(out ** 2)

                ep_cfg = cfg.replace(capacity_factor=c, moe_impl="expert_parallel")
                ep_def = nnx.split(nnx.eval_shape(lambda ep_cfg=ep_cfg: moe.CDMoE(ep_cfg, dtype=jnp.float32,
                                                                                   rngs=nnx.Rngs(0))))[0]

                def layer_loss(p, x, ep_def=ep_def):
                    block = nnx.merge(ep_def, p)(x)
                    return jnp.sum(block.out ** 2) + jnp.sum(block.routing.scores)

                row[f"experts {path}"] = _flops(jax.grad(experts_loss, argnums=(0, 1, 2, 3)), h, w, table, table,
                                                idx, mesh=mesh)
                row[f"layer {path}"] = _flops(jax.grad(layer_loss, argnums=(0, 1)), params, x, mesh=mesh)
            if not base:
                base = row
            ideal = {p: row[f"experts {p}"] * n / base[f"experts {p}"] for p in ("exact", "capacity")}
            g = lambda key: f"{row[key] / 1e9:.3f}"  # noqa: E731
            print(f"| {name} | {n} | {g('experts exact')} | {g('experts capacity')} | {ideal['exact']:.2f} | "
                  f"{ideal['capacity']:.2f} | {g('layer exact')} | {g('layer capacity')} |", flush=True)


def timing_table(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding

    from doge_jax.model import moe
    from doge_jax.model.config import DogeConfig
    from doge_jax.model.layers import MLP
    from doge_jax.parallel import sharding as sh

    n_dev = jax.device_count()
    mesh = _mesh(n_dev)
    cf = args.capacity_factor
    print(f"\nTiming: mesh (1, 1, 1, {n_dev}), tokens={args.tokens} hidden={args.hidden} ffn={args.ffn} "
          f"dtype={args.dtype}; EP exact = capacity_factor 0, EP cap = {cf}")
    print("| experts | top-k | MLP ms | CDMoE ref ms | EP exact ms | EP cap ms | dropped | max abs err out (exact) | "
          "max rel err grad (exact) |")
    print("|---|---|---|---|---|---|---|---|---|")

    def timed(fn, *xs):
        out = fn(*xs)
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            out = fn(*xs)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / args.iters * 1e3, out

    x = jax.random.normal(jax.random.key(0), (args.tokens // 8, 8, args.hidden)).astype(args.dtype)  # [B, T, D]
    for spec in SHAPES.values():
        E, k = spec["num_experts"], spec["num_experts_per_tok"]
        cfg = DogeConfig(vocab_size=8, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=1,
                         num_attention_heads=1, is_moe=True, num_experts=E, num_experts_per_tok=k, dtype=args.dtype)

        def loss(p, x, graphdef):
            block = nnx.merge(graphdef, p)(x)
            stats = block.routing.dropped if block.routing.dropped is not None else jnp.zeros((), jnp.int32)
            return jnp.sum(block.out.astype(jnp.float32) ** 2) + jnp.sum(block.routing.scores), (block.out, stats)

        graphdef, params = nnx.split(moe.CDMoE(cfg, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0)))
        cap_def = nnx.split(moe.CDMoE(cfg.replace(capacity_factor=cf), dtype=jnp.dtype(args.dtype),
                                      rngs=nnx.Rngs(0)))[0]
        step = jax.value_and_grad(loss, has_aux=True)
        mlp_def, mlp_params = nnx.split(MLP(cfg, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0)))
        mlp_step = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(mlp_def, p)(x).out.astype(jnp.float32) ** 2)))

        one = jax.devices()[0]
        mlp_ms, _ = timed(mlp_step, jax.device_put(mlp_params, one), jax.device_put(x, one))
        ref_ms, ((_, (ref_out, _)), ref_g) = timed(jax.jit(lambda p, x: step(p, x, graphdef)),
                                                   jax.device_put(params, one), jax.device_put(x, one))
        p_sh = jax.device_put(params, sh.state_shardings(params, mesh))
        x_sh = jax.device_put(x, NamedSharding(mesh, sh.logical_to_spec((sh.BATCH, None, None))))
        with jax.set_mesh(mesh):
            ep_ms, ((_, (ep_out, _)), ep_g) = timed(jax.jit(lambda p, x: step(p, x, graphdef)), p_sh, x_sh)
            cap_ms, ((_, (_, dropped)), _) = timed(jax.jit(lambda p, x: step(p, x, cap_def)), p_sh, x_sh)
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
        out_err = float(np.abs(f32(ep_out) - f32(ref_out)).max())
        g_err = max(float(np.abs(f32(a) - f32(b)).max() / max(np.abs(f32(b)).max(), 1e-9))
                    for a, b in zip(jax.tree.leaves(ep_g), jax.tree.leaves(ref_g)))
        frac = int(dropped) / (args.tokens * k)
        print(f"| {E} | {k} | {mlp_ms:.1f} | {ref_ms:.1f} | {ep_ms:.1f} | {cap_ms:.1f} | {frac:.1%} | "
              f"{out_err:.1e} | {g_err:.1e} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
