"""The trainer's own train step compiled for real TPU topologies by XLA:TPU and Mosaic (libtpu), on a CPU host.

    python benchmarks/compile_table.py                                  # every preset × both attentions × ROWS
    python benchmarks/compile_table.py --presets doge_60m --layers 2 --seq 512 --rows "v5e:2x2 fsdp=4" --json o.json

Needs the `libtpu` wheel of the installed jax (`pip install "jax[tpu]"`); no TPU is attached. For each (preset,
topology, mesh, attention) `jax.experimental.topologies.get_topology_desc(topology, "tpu")` gives the abstract
chips, the mesh is laid over them (doge_jax.trainer.mesh.make_mesh), and the Trainer sets the run up as
`python -m doge_jax.train` would and lowers its jitted train step (`Trainer.lower_train_step(platform="tpu")`,
the kernels traced for TPU); `.compile()` then runs the TPU compiler, which refuses what a TPU would refuse
(Mosaic's layout and VMEM rules, HBM capacity). Reported per row:
  result        compiled, or the compiler's / the kernel dispatcher's one-line refusal
  kernels       the Mosaic calls (`tpu_custom_call`) in the lowered module, per layer
  HBM per chip  compiled.memory_analysis(): arguments + outputs − donated + temp (GB = 1e9), and temp alone
  cost          FLOPs per chip of the WHOLE step, every loop counted as often as it runs (the accumulation
                scan over micro-batches, the chunked loss's scan over positions), read from the compiled HLO by
                benchmarks/hlo_cost.py, beside 6 × matmul parameters × the step's tokens / chips
                (trainer/flops.py); and compiled.cost_analysis()'s FLOPs and bytes, which count each loop body
                once (so about one micro-batch, less the loss chunks after the first). The Mosaic kernels are
                opaque to both (no cost estimate is attached), so with pallas_tpu the attention's own FLOPs are
                missing.
Global batch: the preset's batch_size × seq_len, split into micro-batches of --micro-rows rows per data-parallel
chip (grad_accum_steps = batch_size / (rows × data-parallel chips)), bf16, remat "full" (--remat: others, e.g.
"none,attention,full" for what saving the attention's output costs per chip).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__":  # entry point only: never change the environment of a process that imports this
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import jax  # noqa: E402

from doge_jax.model.config import DogeConfig  # noqa: E402
from doge_jax.trainer import flops, lowering, mesh as mesh_lib  # noqa: E402
import hlo_cost  # noqa: E402
from lowering_table import parse_mesh, preset_config  # noqa: E402

PRESETS = ["doge_20m", "doge_60m", "doge_160m", "doge_320m", "doge_40m_moe"]
IMPLS = ["pallas_tpu", "xla"]
# (topology, mesh): one chip generation per slice, and the 8-chip v5e slice with two mixes of axes. The expert
# mesh is the MoE preset's; the dense presets take fsdp × tensor.
ROWS = ["v5e:2x2 fsdp=4", "v6e:2x2 fsdp=4", "v5p:2x2x1 fsdp=4", "v5e:2x4 fsdp=4,tensor=2",
        "v5e:2x4 data=2,expert=4"]
HBM_GB = {"v5e": 16, "v6e": 32, "v5p": 95}
GB = 1e9


def chip(topology: str) -> str:
    return topology.split(":")[0]


def compile_step(preset: str, topology: str, mesh_spec: str, impl: str, *, layers: int | None,
                 seq_len: int | None, micro_rows: int, remat: str = "full"):
    """(row, config, devices, compiled): the preset's train step compiled for `topology`'s chips ("cpu": this
    host's first device, compiled by XLA:CPU, for dry runs); compiled is None when the dispatcher, the config or
    the compiler refused (the row then says so in one line)."""
    row = {"preset": preset, "topology": topology, "mesh": mesh_spec, "impl": impl, "remat": remat}
    config = preset_config(preset, impl=impl, layers=layers, remat=remat, seq_len=seq_len)
    if topology == "cpu":
        devices, platform = jax.devices()[:1], None
    else:
        from jax.experimental import topologies

        devices, platform = topologies.get_topology_desc(topology, "tpu").devices, "tpu"
    mesh = mesh_lib.make_mesh(parse_mesh(mesh_spec), devices=devices)
    dp = mesh_lib.data_parallel_size(mesh)
    config.grad_accum_steps = max(1, config.batch_size // (dp * micro_rows))
    row.update(layers=config.model.num_hidden_layers, batch=config.batch_size, seq_len=config.seq_len,
               grad_accum=config.grad_accum_steps, chips=len(devices), device_kind=devices[0].device_kind)
    t0 = time.perf_counter()
    try:
        lowered = lowering.lowered_train_step(config, mesh, platform)
    except ValueError as e:  # the dispatcher or the config refuses: one line
        return {**row, "status": "refused", "message": str(e).splitlines()[0]}, config, devices, None
    counts = lowering.kernel_report(lowered.as_text(), platform).counts() if platform else {}
    row.update(kernel_calls=counts, lower_s=round(time.perf_counter() - t0, 1))
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler's refusal (XlaRuntimeError): its first meaningful line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return ({**row, "status": "compiler refused", "message": (lines or [type(e).__name__])[0][:400],
                 "compile_s": round(time.perf_counter() - t0, 1)}, config, devices, None)
    return {**row, "status": "compiled", "compile_s": round(time.perf_counter() - t0, 1)}, config, devices, compiled


def compile_row(preset: str, topology: str, mesh_spec: str, impl: str, *, layers: int | None, seq_len: int | None,
                micro_rows: int, remat: str = "full") -> dict:
    row, config, devices, compiled = compile_step(preset, topology, mesh_spec, impl, layers=layers,
                                                  seq_len=seq_len, micro_rows=micro_rows, remat=remat)
    if compiled is None:
        return row
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict on older jax
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    # What the model's matmuls cost for the whole step, spread over the chips: the scale the step's FLOPs should
    # have (more by the chunked loss's recompute of the head in the backward pass, norms, loss and optimizer).
    model = DogeConfig.from_dict(config.model.to_dict())
    matmul_flops = 6.0 * flops.matmul_params_per_token(model) * config.batch_size * config.seq_len / len(devices)
    try:
        ops = hlo_cost.op_costs(hlo_cost.parse(compiled.as_text()))
        step, once = hlo_cost.totals(ops), hlo_cost.totals(ops, once=True)
        step_cost = {"flops": step["flops"], "matmul_flops": step.get("matmul_flops", 0.0),
                     "flops_once": once["flops"]}
    except ValueError as e:  # a loop whose trip count is not readable: no whole-step figure
        step_cost = {"flops": None, "flops_note": str(e)}
    return {**row, **step_cost,
            "matmul_flops_per_chip": matmul_flops,
            "argument_gb": mem.argument_size_in_bytes / GB, "temp_gb": mem.temp_size_in_bytes / GB,
            "peak_gb": peak / GB, "hbm_gb": HBM_GB.get(chip(topology)), "flops_xla": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def markdown(rows) -> str:
    out = ["| preset (layers) | topology | mesh | attention | remat | accum | result | Mosaic calls per layer | "
           "HBM peak / chip GB | temp GB | step TFLOP / chip (÷ 6·P·tokens) | cost_analysis TFLOP | "
           "cost_analysis GB accessed / chip | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = ", ".join(f"{k.removeprefix('dma_tpu_')} {v / r['layers']:g}" for k, v in
                          r.get("kernel_calls", {}).items()) or ("none" if "kernel_calls" in r else "")
        result = r["status"] + (f": {r['message']}" if "message" in r else "")
        cells = [f"{r['preset']} ({r.get('layers', '')})", r["topology"], r["mesh"], r["impl"], r.get("remat", ""),
                 str(r.get("grad_accum", "")), result, calls]
        if r["status"] == "compiled":
            cells += [f"{r['peak_gb']:.2f} of {r['hbm_gb']}", f"{r['temp_gb']:.2f}",
                      (f"{r['flops'] / 1e12:.3f} ({r['flops'] / r['matmul_flops_per_chip']:.2f})"
                       if r["flops"] is not None else "unread"), f"{r['flops_xla'] / 1e12:.3f}",
                      f"{r['bytes_accessed'] / GB:.1f}", str(r["compile_s"])]
        else:
            cells += ["", "", "", "", "", str(r.get("compile_s", ""))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--rows", default=";".join(ROWS), help="';'-separated 'TOPOLOGY MESH' pairs")
    p.add_argument("--layers", type=int, default=0, help="compile only this many layers (0: the preset's)")
    p.add_argument("--seq", type=int, default=0, help="sequence length (0: the preset's)")
    p.add_argument("--micro-rows", type=int, default=4, help="rows per data-parallel chip in each micro-batch")
    p.add_argument("--remat", default="full", help="comma-separated model.remat_policy values")
    p.add_argument("--json", default="", help="also write the rows here")
    a = p.parse_args(argv)
    rows = []
    for preset in a.presets.split(","):
        is_moe = preset_config(preset, impl="xla", layers=None, remat="full").model.is_moe
        for spec in a.rows.split(";"):
            topology, mesh_spec = spec.split()
            if ("expert=" in mesh_spec) != bool(is_moe):  # expert axes for the MoE preset only, and it gets one
                continue
            for impl in a.impls.split(","):
                for remat in a.remat.split(","):
                    row = compile_row(preset, topology, mesh_spec, impl, layers=a.layers or None,
                                      seq_len=a.seq or None, micro_rows=a.micro_rows, remat=remat)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if a.json:
                        with open(a.json + ".tmp", "w") as f:
                            json.dump({"jax": jax.__version__, "rows": rows}, f, indent=1)
                        os.replace(a.json + ".tmp", a.json)
    import importlib.metadata

    print(f"\njax {jax.__version__}, libtpu {importlib.metadata.version('libtpu')}, compiled on a CPU host\n")
    print(markdown(rows))
    return 0 if all(r["status"] in ("compiled", "refused") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
