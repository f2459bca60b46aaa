"""Per-device memory of the real train step, measured by the compiler on fake CPU devices (compiles, never trains).

    python benchmarks/memory_table.py                                   # 5 presets x 8 / 64 devices x meshes
    python benchmarks/memory_table.py --devices 256 --presets doge_320m --meshes "data=16,fsdp=16"
    python benchmarks/memory_table.py --presets doge_160m --devices 64 --meshes "data=8,fsdp=8" \\
        --remat none,full,dots,dots_with_no_batch_dims --grad-accum 1,4        # remat x accumulation
    python benchmarks/memory_table.py --compare-constraints ...         # with / without the layer-boundary
                                                                        # sharding constraints
    python benchmarks/memory_table.py --single-device                   # each preset at its global batch on ONE
                                                                        # device of 16/24/80/141 GB: micro-batches
                                                                        # "auto" picks, before/after the chunked loss

Each row is one preset (configs/<preset>.py at its own batch_size and seq_len, model.dtype=bfloat16 unless
--dtype) on one mesh (config.mesh; sizes multiply to the device count), remat policy and grad_accum_steps. The
Trainer sets the run up exactly as `python -m doge_jax.train` would and lowers its jitted train step
(`Trainer.lower_train_step`) for abstract inputs; XLA compiles it for N fake CPU devices and
`compiled.memory_analysis()` gives, per device:
  params, opt   the fp32 master weights and the AdamW moments on one device (from their shardings)
  temp          everything else the step holds at its peak: activations kept for the backward pass,
                gradients, collectives' buffers, workspace (the compiler's temp allocation)
  peak          arguments + outputs − donated (aliased) + temp
  fits          the peak against 16 GB (TPU v5e), 80 GB (H100), 95 GB (TPU v5p)
What the CPU compile cannot tell: the attention here is the XLA reference (`attention_impl` "auto" on CPU),
which keeps [B, N, T, S] scores; the Pallas kernels on GPU / TPU keep O(B·N·T) instead, so `temp` is an upper
bound there. The CPU compiler's buffer assignment also differs in detail from the TPU / GPU compilers'.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

PRESETS = ["doge_20m", "doge_60m", "doge_160m", "doge_320m", "doge_40m_moe"]
# (data, fsdp, tensor, expert) mixes per device count; a preset skips a mesh its batch does not divide.
MESHES = {
    8: ["fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2", "data=2,expert=4"],
    64: ["fsdp=64", "data=8,fsdp=8", "fsdp=16,tensor=4", "data=8,expert=8"],
    256: ["data=16,fsdp=16", "fsdp=64,tensor=4", "data=32,expert=8"],
}
DEVICES_GB = {"v5e": 16, "H100": 80, "v5p": 95}
GB = 1e9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--devices", default="8,64", help="comma-separated device counts (fake CPU devices)")
    p.add_argument("--meshes", default="", help="';'-separated meshes such as 'data=8,fsdp=8' (default: MESHES)")
    p.add_argument("--remat", default="none,full", help="comma-separated model.remat_policy values")
    p.add_argument("--grad-accum", default="1", help="comma-separated grad_accum_steps values")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--compare-constraints", action="store_true",
                   help="also compile each row without the decoder's layer-boundary sharding constraints")
    p.add_argument("--single-device", action="store_true",
                   help="one device per preset: the micro-batches grad_accum_steps='auto' picks for each of "
                        "--device-gb, with the chunked loss and without it (loss_chunk_tokens=-1)")
    p.add_argument("--device-gb", default="16,24,80,141", help="device sizes for --single-device")
    p.add_argument("--losses", default="full,chunked",
                   help="for --single-device: 'full' (loss_chunk_tokens=-1), 'chunked' (0, the default), or both")
    return p.parse_args(argv)


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    for part in filter(None, text.split(",")):
        axis, _, size = part.partition("=")
        if axis not in sizes or not size.isdigit():
            raise SystemExit(f"--meshes: {part!r} must be AXIS=SIZE with AXIS in {list(sizes)}")
        sizes[axis] = int(size)
    return sizes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.single_device:
        return single_device(args)
    counts = [int(c) for c in args.devices.split(",")]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(counts)}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    print(f"# jax {jax.__version__}, {jax.device_count()} fake {jax.devices()[0].platform} devices; "
          f"model.dtype={args.dtype}; GB = 1e9 bytes per device")
    header = "| preset | params | devices | mesh | remat | accum | params | opt | temp | peak | v5e 16 | H100 80 | v5p 95 |"
    if args.compare_constraints:
        header += " peak without constraints |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for preset in args.presets.split(","):
        for n in counts:
            meshes = args.meshes.split(";") if args.meshes else MESHES[n]
            for mesh_text in meshes:
                mesh = parse_mesh(mesh_text)
                if _prod(mesh.values()) != n:
                    continue
                for remat in args.remat.split(","):
                    for accum in (int(a) for a in args.grad_accum.split(",")):
                        row(preset, n, mesh, remat, accum, args)
    return 0


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def row(preset: str, n: int, mesh: dict, remat: str, accum: int, args) -> None:
    import importlib

    from doge_jax.model import decoder as model_lib
    from doge_jax.model.config import DogeConfig
    from doge_jax.trainer.validate import ConfigError

    config = importlib.import_module(f"configs.{preset}").get_config()
    config.model.dtype = args.dtype
    config.model.remat_policy = remat
    config.grad_accum_steps = accum
    config.mesh.update(mesh)
    config.progress_bar = config.tensorboard = False
    mesh_text = ",".join(f"{a}={s}" for a, s in mesh.items() if s > 1) or "1"
    is_moe = config.model.is_moe
    if (mesh["expert"] > 1) != bool(is_moe):  # expert axes only for the MoE preset, and it always gets one
        return
    n_params = model_lib.count_params(DogeConfig.from_dict(config.model.to_dict()))
    prefix = f"| {preset} | {n_params / 1e6:.0f}M | {n} | {mesh_text} | {remat} | {accum} |"
    t0 = time.perf_counter()
    try:
        stats = measure(config, n)
        extra = ""
        if args.compare_constraints:
            extra = f" {measure(config, n, constraints=False)['peak'] / GB:.2f} |"
    except ConfigError as e:
        print(f"{prefix} skipped: {e} |", flush=True)
        return
    fits = " | ".join("yes" if stats["peak"] <= gb * GB else "no" for gb in DEVICES_GB.values())
    print(f"{prefix} {stats['params'] / GB:.2f} | {stats['opt'] / GB:.2f} | {stats['temp'] / GB:.2f} | "
          f"{stats['peak'] / GB:.2f} | {fits} |{extra}", flush=True)
    print(f"  ({config.batch_size} x {config.seq_len} tokens per step; compiled in "
          f"{time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)


def measure(config, n: int, *, constraints: bool = True) -> dict:
    """Compiles the Trainer's train step for `config` on n fake devices; per-device bytes."""
    import jax
    import jax.numpy as jnp

    from doge_jax.parallel import sharding as sh
    from doge_jax.trainer import Trainer
    from doge_jax.trainer.mesh import make_mesh

    A, M, T = config.grad_accum_steps, config.batch_size // config.grad_accum_steps, config.seq_len
    batch = {k: jax.ShapeDtypeStruct((A, M, T), jnp.int32) for k in ("input_ids", "targets", "segment_ids",
                                                                        "positions")}
    original = sh.constrain
    if not constraints:  # what the partitioner picks from propagation alone
        sh.constrain = lambda x, logical, rules=sh.RULES: x
    try:
        with tempfile.TemporaryDirectory() as workdir:
            trainer = Trainer(config, workdir, mesh=make_mesh(config.mesh, devices=jax.devices()[:n]))
            compiled = trainer.lower_train_step(batch).compile()

    finally:
        sh.constrain = original
    mem = compiled.memory_analysis()

    def per_device(tree, shardings) -> int:
        return sum(_shard_bytes(x, s) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))

    params = per_device(trainer.abstract_params, trainer.param_sharding)
    opt = per_device(trainer.abstract_opt, trainer.state_sharding["opt_state"])
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    return {"params": params, "opt": opt, "temp": mem.temp_size_in_bytes, "peak": peak}


DEVICE_NAMES = {16: "16 GB (v5e, T4)", 24: "24 GB (RTX 4090, L4)", 80: "80 GB (H100, A100)", 141: "141 GB (H200)"}


def single_device(args) -> int:
    """Each preset at its own global batch on ONE device: what grad_accum_steps="auto" (doge_jax/trainer/fit.py)
    picks for each device size, from the compiled step's memory, with the chunked loss and without it."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import importlib

    import jax
    import jax.numpy as jnp

    from doge_jax.trainer import Trainer, fit
    from doge_jax.trainer.mesh import make_mesh

    sizes = [int(x) for x in args.device_gb.split(",")]
    print(f"# jax {jax.__version__}, one {jax.devices()[0].platform} device; model.dtype={args.dtype}, "
          f"model.remat_policy='auto'; usable = (1 - {fit.MARGIN['accelerator']:.0%}) x the device's GB "
          "(fit.MARGIN); GB = 1e9 bytes")
    print("| preset | batch x seq | loss | device | micro-batches | sequences per micro-batch | tokens per "
          "micro-batch | peak GB | compiled |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        losses = {"full": (-1, "full logits"), "chunked": (0, "chunked")}
        for chunk, label in (losses[name] for name in args.losses.split(",")):
            cache: dict[int, object] = {}

            def compile_at(accum, preset=preset, chunk=chunk, cache=cache):
                if accum not in cache:
                    config = importlib.import_module(f"configs.{preset}").get_config()
                    config.model.dtype, config.grad_accum_steps, config.loss_chunk_tokens = args.dtype, accum, chunk
                    config.progress_bar = config.tensorboard = False
                    A, M, T = accum, config.batch_size // accum, config.seq_len
                    batch = {k: jax.ShapeDtypeStruct((A, M, T), jnp.int32)
                             for k in ("input_ids", "targets", "segment_ids", "positions")}
                    t0 = time.perf_counter()
                    with tempfile.TemporaryDirectory() as workdir:
                        trainer = Trainer(config, workdir, mesh=make_mesh(config.mesh, devices=jax.devices()[:1]))
                        cache[accum] = trainer.lower_train_step(batch).compile()
                    print(f"  ({preset} {label} {accum} micro-batches: {fit.step_peak(cache[accum]) / GB:.2f} GB, "
                          f"compiled in {time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
                return cache[accum]

            config = importlib.import_module(f"configs.{preset}").get_config()
            B, T = config.batch_size, config.seq_len
            for gb in sizes:
                memory = fit.DeviceMemory(limit=int(gb * GB), margin=fit.MARGIN["accelerator"],
                                          source=DEVICE_NAMES.get(gb, f"{gb} GB"))
                prefix = f"| {preset} | {B} x {T} | {label} | {memory.source} |"
                try:
                    choice = fit.choose(compile_at, batch_size=B, row_multiple=1, memory=memory, data_parallel=1)
                except fit.DoesNotFit:
                    print(f"{prefix} does not fit (1 sequence: {fit.step_peak(compile_at(B)) / GB:.1f} GB) | | | | "
                          f"{len(cache)} |", flush=True)
                    continue
                rows = B // choice.num_micro
                print(f"{prefix} {choice.num_micro} | {rows} | {rows * T:,} | {choice.peak / GB:.1f} | "
                      f"{len(cache)} |", flush=True)
    return 0


def _shard_bytes(x, sharding) -> int:
    shape = sharding.shard_shape(x.shape)
    return _prod(shape) * x.dtype.itemsize


if __name__ == "__main__":
    sys.exit(main())
