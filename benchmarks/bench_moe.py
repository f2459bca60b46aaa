"""CDMoE layer benchmark: the shared MLP alone, the CDMoE with the reference experts on one device, and the
expert-parallel CDMoE on a mesh — forward + backward, checked against each other.

    python benchmarks/bench_moe.py                       # CPU: 8 fake devices, small shapes, correctness first
    python benchmarks/bench_moe.py --tokens 16384 --hidden 1024 --ffn 2048 --dtype bfloat16   # on a GPU/TPU

Rows: every (num_experts, top_k) in --experts × --top-k (default 1024 / 16384 experts, top-8 / top-64). On CPU
fake devices the "devices" share the host's cores, so timings there say nothing about collectives: read the
max |EP − reference| columns; throughput means something only on real accelerators.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--top-k", type=int, nargs="+", default=[8, 64])
    p.add_argument("--tokens", type=int, default=512, help="tokens per step (batch × length)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor,expert (default: all devices on expert)")
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
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding

    from doge_jax.model import moe
    from doge_jax.parallel import sharding as sh
    from doge_jax.model.config import DogeConfig
    from doge_jax.model.layers import MLP

    n_dev = jax.device_count()
    shape = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else (1, 1, 1, n_dev)
    mesh = jax.make_mesh(shape, sh.MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                         devices=jax.devices()[:int(np.prod(shape))])
    print(f"# {jax.devices()[0].device_kind} × {n_dev}, mesh (data, fsdp, tensor, expert) = {shape}, "
          f"tokens={args.tokens} hidden={args.hidden} ffn={args.ffn} dtype={args.dtype}")
    print("| experts | top-k | MLP ms | CDMoE ref ms | CDMoE EP ms | EP tok/s | max abs err out | max rel err grad |")
    print("|---|---|---|---|---|---|---|---|")

    def timed(fn, *xs):
        out = fn(*xs)
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            out = fn(*xs)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / args.iters * 1e3, out

    x = jax.random.normal(jax.random.key(0), (args.tokens // 8, 8, args.hidden)).astype(args.dtype)  # [B, T, D]
    for E in args.experts:
        for k in args.top_k:
            cfg = DogeConfig(vocab_size=8, hidden_size=args.hidden, intermediate_size=args.ffn,
                             num_hidden_layers=1, num_attention_heads=1, is_moe=True, num_experts=E,
                             num_experts_per_tok=k, dtype=args.dtype)
            layer = moe.CDMoE(cfg, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0))
            graphdef, params = nnx.split(layer)

            def loss(p, x, graphdef=graphdef):
                block = nnx.merge(graphdef, p)(x)
                return jnp.sum(block.out.astype(jnp.float32) ** 2) + jnp.sum(block.routing.scores), block.out

            step = jax.value_and_grad(loss, has_aux=True)
            mlp_def, mlp_params = nnx.split(MLP(cfg, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0)))
            mlp_step = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(mlp_def, p)(x).out.astype(jnp.float32) ** 2)))

            one = jax.devices()[0]
            mlp_ms, _ = timed(mlp_step, jax.device_put(mlp_params, one), jax.device_put(x, one))
            ref_ms, ((_, ref_out), ref_g) = timed(jax.jit(step), jax.device_put(params, one),
                                                 jax.device_put(x, one))
            p_sh = jax.device_put(params, sh.state_shardings(params, mesh))
            x_sh = jax.device_put(x, NamedSharding(mesh, sh.logical_to_spec((sh.BATCH, None, None))))
            with jax.set_mesh(mesh):
                ep_ms, ((_, ep_out), ep_g) = timed(jax.jit(step), p_sh, x_sh)
            f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
            out_err = float(np.abs(f32(ep_out) - f32(ref_out)).max())
            g_err = max(float(np.abs(f32(a) - f32(b)).max() / max(np.abs(f32(b)).max(), 1e-9))
                        for a, b in zip(jax.tree.leaves(ep_g), jax.tree.leaves(ref_g)))
            print(f"| {E} | {k} | {mlp_ms:.1f} | {ref_ms:.1f} | {ep_ms:.1f} | {args.tokens / ep_ms * 1e3:,.0f} | "
                  f"{out_err:.1e} | {g_err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
