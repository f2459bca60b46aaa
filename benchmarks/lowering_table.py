"""Where the DMA kernels land in the full sharded train step, per preset, mesh and platform, lowered on a CPU host.

    python benchmarks/lowering_table.py                               # doge_60m + doge_160m, 3 meshes, cuda + tpu
    python benchmarks/lowering_table.py --presets doge_60m --layers 2 --json out.json   # what the CI test runs

For each (preset, mesh, platform) the trainer's own train step (doge_jax.trainer.lowering.lowered_train_step, i.e. Trainer.lower_train_step:
the state/batch shardings of Trainer._setup, traced under jax.set_mesh) is lowered for that platform on 8 fake
CPU devices, with the kernels traced for it (doge_jax.kernels.target.lowering_for), bf16 and remat on. Nothing is
allocated or compiled for the target. The table reports the kernel custom calls found (`__gpu$xla.gpu.triton` /
`tpu_custom_call`, by kernel name, total and per layer), how many sit outside a shard_map's manual region
(should be 0), and the operand type of the first forward call (the per-shard shape).

"The collectives around attention" come from a second build of the same step for this host (`--compile-meshes`,
kernels in interpret mode, fewer layers and a shorter sequence: the pattern per layer does not depend on
either), compiled, so that the SPMD partitioner has inserted them: the table lists every collective whose op_name
names a shard_map (a re-layout at a kernel call's boundary: should be none) and, for context, the whole step's
collectives by kind (FSDP gathers of parameters, gradient reductions...). --control adds a row that proves the
detector sees a boundary collective: a q sharded over the sequence, which the shard_map must re-lay out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Only as the program's entry point: imported by a test or another benchmark, changing the environment could not
# reach that process's jax and would leak 8 fake devices into every subprocess it starts afterwards.
if __name__ == "__main__":
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from collections import Counter  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402

from doge_jax.parallel import sharding as sh  # noqa: E402
from doge_jax.trainer import lowering, mesh as mesh_lib  # noqa: E402

PLATFORM_IMPL = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}


def parse_mesh(spec: str) -> ml_collections.ConfigDict:
    """'fsdp=4,tensor=2' → config.mesh with the other axes 1."""
    sizes = {axis: 1 for axis in sh.MESH_AXES}
    for part in spec.split(","):
        axis, _, size = part.partition("=")
        if axis not in sizes or not size.isdigit():
            raise SystemExit(f"--meshes: {part!r} must be AXIS=SIZE with AXIS one of {list(sh.MESH_AXES)}")
        sizes[axis] = int(size)
    return ml_collections.ConfigDict(sizes)


def preset_config(preset: str, *, impl: str, layers: int | None, remat: str, seq_len: int | None = None,
                  batch_size: int | None = None):
    config = importlib.import_module(f"configs.{preset}").get_config()
    m = config.model
    m.dtype, m.remat_policy, m.attention_impl = "bfloat16", remat, impl
    if layers:
        m.num_hidden_layers = min(layers, m.num_hidden_layers)
    if seq_len:
        config.seq_len = seq_len
    if batch_size:
        config.batch_size = batch_size
    return config


def lowering_row(preset, mesh_spec, platform, *, layers, remat) -> dict:
    config = preset_config(preset, impl=PLATFORM_IMPL[platform], layers=layers, remat=remat)
    mesh = mesh_lib.make_mesh(parse_mesh(mesh_spec))
    m = config.model
    row = {"preset": preset, "mesh": mesh_spec, "platform": platform, "remat": remat,
           "layers": m.num_hidden_layers, "batch": config.batch_size, "seq_len": config.seq_len}
    t0 = time.perf_counter()
    try:
        text = lowering.lower_train_step(config, mesh, platform)
    except ValueError as e:  # a kernel that refuses the call, a mesh the kernel cannot split: one line
        return {**row, "status": "refused", "message": str(e).splitlines()[0]}
    report = lowering.kernel_report(text, platform)
    counts = report.counts()
    first_fwd = next((c for c in report.calls if c.name in ("dma_forward", "?")), None)
    batch_axes = sh.fit_spec(sh.logical_to_spec((sh.BATCH,)), (config.batch_size,), mesh)[0]
    batch_axes = () if batch_axes is None else ((batch_axes,) if isinstance(batch_axes, str) else batch_axes)
    return {**row, "status": "lowered", "lower_s": round(time.perf_counter() - t0, 1), "kernel_calls": counts,
            "per_layer": {k: v / m.num_hidden_layers for k, v in counts.items()},
            "outside_manual": sum(c.manual_axes is None for c in report.calls),
            "manual_axes": sorted({a for c in report.calls for a in (c.manual_axes or ())}),
            "manual_regions": report.manual_regions, "first_forward_operand": (first_fwd.operand_shapes or ["?"])[0]
            if first_fwd else None, "batch_shards": math.prod(mesh.shape[a] for a in batch_axes),
            "tensor_shards": mesh.shape["tensor"], "module_collectives": report.collectives}


def compile_row(preset, mesh_spec, *, layers, remat, seq_len, compare_xla) -> dict:
    mesh = mesh_lib.make_mesh(parse_mesh(mesh_spec))
    dp = mesh_lib.data_parallel_size(mesh)

    def config_for(impl):
        config = preset_config(preset, impl=impl, layers=layers, remat=remat, seq_len=seq_len, batch_size=2 * dp)
        config.model.keep_window_size = seq_len // 4  # the top-k active, as in any long-context run
        return config

    config = config_for("pallas_gpu")
    row = {"preset": preset, "mesh": mesh_spec, "platform": "cpu (compiled, pallas_gpu interpret)", "remat": remat,
           "layers": config.model.num_hidden_layers, "batch": config.batch_size, "seq_len": seq_len}
    t0 = time.perf_counter()
    try:
        hlo = lowering.compile_on_host(config, mesh)
    except ValueError as e:
        return {**row, "status": "refused", "message": str(e).splitlines()[0]}
    found = lowering.collectives(hlo)
    boundary = lowering.shard_map_collectives(hlo)
    row = {**row, "status": "compiled", "compile_s": round(time.perf_counter() - t0, 1),
           "shard_map_collectives": boundary, "step_collectives": dict(Counter(c["op"] for c in found))}
    if compare_xla:  # the same step with the reference attention: which collectives the kernel path changes
        xla = lowering.collectives(lowering.compile_on_host(config_for("xla"), mesh))
        row["step_collectives_xla"] = dict(Counter(c["op"] for c in xla))
    return row


def control_row() -> dict:
    """A q arriving sharded over the sequence at a kernel on (data=2, fsdp=2, tensor=2): the shard_map must
    re-lay it out (batch-major), and the detector must see that collective."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from doge_jax.model import attention_impl
    from doge_jax.model.mask import MaskSpec

    mesh = mesh_lib.make_mesh(parse_mesh("data=2,fsdp=2,tensor=2"))
    q = jax.ShapeDtypeStruct((8, 64, 4, 16), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, ("data", "fsdp"), "tensor")))  # [B, T, N, H]
    kv = jax.ShapeDtypeStruct((8, 64, 2, 16), jnp.float32)
    dt = jax.ShapeDtypeStruct((8, 2, 64), jnp.float32)

    def f(q, k, v, dt):
        return attention_impl.attention(q, k, v, dt, MaskSpec(keep_window_size=16), scale=0.25, impl="pallas_gpu")

    with jax.set_mesh(mesh):
        hlo = jax.jit(f).trace(q, kv, kv, dt).lower().compile().as_text()
    return {"preset": "control: q arrives sharded over T", "mesh": "data=2,fsdp=2,tensor=2", "platform": "cpu",
            "status": "compiled", "shard_map_collectives": lowering.shard_map_collectives(hlo)}


def markdown(rows) -> str:
    out = ["| preset (layers) | mesh | platform | result | kernel calls (per layer) | outside shard_map | "
           "first fwd operand (per shard) | collectives at shard_map boundary | step collectives (with xla "
           "attention) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = ", ".join(f"{k} {v} ({r['per_layer'][k]:g})" for k, v in r.get("kernel_calls", {}).items())
        boundary = r.get("shard_map_collectives")
        boundary = "" if boundary is None else (", ".join(f"{c['op']} {c['type']}" for c in boundary) or "none")
        step = ", ".join(f"{k} {v}" for k, v in sorted(r.get("step_collectives", {}).items()))
        if "step_collectives_xla" in r:
            step += " (" + ", ".join(f"{k} {v}" for k, v in sorted(r["step_collectives_xla"].items())) + ")"
        result = r["status"] + (f": {r['message']}" if "message" in r else "")
        out.append(f"| {r['preset']} ({r.get('layers', '')}) | {r['mesh']} | {r['platform']} | {result} | {calls} | "
                   f"{r.get('outside_manual', '')} | {r.get('first_forward_operand') or ''} | {boundary} | {step} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="doge_60m,doge_160m")
    p.add_argument("--meshes", default="fsdp=4,tensor=2;data=8;fsdp=8", help="';'-separated AXIS=SIZE lists")
    p.add_argument("--platforms", default="cuda,tpu")
    p.add_argument("--layers", type=int, default=0, help="lower only this many layers (0: the preset's)")
    p.add_argument("--remat", default="full", choices=["full", "dots", "none", "attention", "auto"])
    p.add_argument("--compile-meshes", default="fsdp=4,tensor=2;data=8", help="'' to skip the compiled check")
    p.add_argument("--compile-layers", type=int, default=2)
    p.add_argument("--compile-seq", type=int, default=256)
    p.add_argument("--no-compare-xla", action="store_true", help="skip compiling the xla-attention step too")
    p.add_argument("--control", action="store_true", help="add the detector's positive control")
    p.add_argument("--json", default="", help="also write the rows here")
    a = p.parse_args(argv)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json + ".tmp", "w") as f:
                json.dump(rows, f, indent=1)
            os.replace(a.json + ".tmp", a.json)

    for preset in a.presets.split(","):
        for mesh_spec in a.meshes.split(";"):
            for platform in a.platforms.split(","):
                emit(lowering_row(preset, mesh_spec, platform, layers=a.layers or None, remat=a.remat))
        for mesh_spec in filter(None, a.compile_meshes.split(";")):
            emit(compile_row(preset, mesh_spec, layers=a.compile_layers, remat=a.remat, seq_len=a.compile_seq,
                             compare_xla=not a.no_compare_xla))
    if a.control:
        emit(control_row())
    print(f"\njax {jax.__version__}, lowered on {jax.device_count()} fake {jax.default_backend()} devices\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
