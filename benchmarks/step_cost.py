"""What one train step costs a TPU chip, read from the compiled program: FLOPs, bytes, and the step time they allow.

    python benchmarks/step_cost.py                               # every preset on v5e-8, v6e-8, v5p-8 (libtpu)
    python benchmarks/step_cost.py --presets doge_160m --slices v5p-8 --top 10
    python benchmarks/step_cost.py --dry-run                     # doge_20m, 2 layers, T=256, on this CPU (no libtpu)

Each preset's train step at its own global batch (bf16, remat "full", the Mosaic attention kernels, --micro-rows
rows per chip per micro-batch) is compiled by
XLA:TPU for the slice's abstract chips (benchmarks/compile_table.compile_step; the mesh is fsdp over every chip, the
MoE preset's data × expert), and its optimised HLO is costed op by op by benchmarks/hlo_cost.py, every loop counted
as often as it runs (micro-batches, loss chunks). Per chip:

  FLOPs       matmul (a dot, or a fusion holding one) and the rest (elementwise, reductions); the Mosaic kernels
              are opaque to XLA, so their FLOPs are the model's attention FLOPs (trainer/flops.py: fwd + bwd, one
              more forward per extra forward kernel call per layer) -- an upper bound, as the kernels skip masked
              tiles
  bytes       what each top-level op reads and writes in HBM (a fusion at its boundary)
  intensity   FLOPs / byte, against the chip's ridge point (peak FLOP/s / HBM bytes/s)
  bound       the step time no schedule can beat on one chip: max(FLOPs / peak, bytes / HBM bandwidth) over
              the whole step (collectives over ICI and the transcendental unit not counted)
  serial      Σ over ops of max(FLOPs / peak, bytes / HBM bandwidth): the time if no op overlapped another
              (async copies and slices, which the TPU overlaps with compute, are in it), split matmul + other +
              kernels
  MFU ceiling the model FLOPs of the step (6·P·tokens + attention, trainer/flops.py) / (peak × bound), and
              in parentheses / (peak × serial)

Then the non-matmul ops that cost the most time, grouped by the source op jax recorded (op_name metadata), so
the largest memory-bound cost of a small preset is named. Chip figures are vendor peaks (bf16 FLOP/s, HBM GB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

if __name__ == "__main__":  # entry point only: never change the environment of a process that imports this
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

from doge_jax.model.config import DogeConfig  # noqa: E402
from doge_jax.trainer import flops  # noqa: E402
import compile_table  # noqa: E402
import hlo_cost  # noqa: E402

# Slice name -> (topology, chips); chip -> (bf16 FLOP/s, HBM bytes/s), vendor figures.
SLICES = {"v5e-8": "v5e:2x4", "v6e-8": "v6e:2x4", "v5p-8": "v5p:2x2x1"}
CHIPS = {"v5e": (197e12, 819e9), "v6e": (918e12, 1640e9), "v5p": (459e12, 2765e9)}
PRESETS = compile_table.PRESETS


def mesh_for(preset: str, chips: int) -> str:
    if preset.endswith("_moe"):
        expert = min(4, chips)
        return f"data={chips // expert},expert={expert}" if chips > expert else f"expert={expert}"
    return f"fsdp={chips}"


_WRAPPER = re.compile(r"^(jit|pjit|jvp|transpose|checkpoint|remat|remat2|while|body|cond|shard_map|"
                      r"custom_vjp_call|custom_jvp_call|scan|vmap|closed_call|core_call)\b")


def source(op: hlo_cost.OpCost) -> str:
    """A short label for the op's origin: the Python line jax recorded and the primitive (its op_name's last
    parts without jax's wrapper frames), marked (bwd) when it belongs to the backward pass."""
    parts = [p for p in op.op_name.split("/") if p and not _WRAPPER.match(p)]
    label = " ".join(x for x in (op.source, "/".join(parts[-2:])) if x) or f"({op.opcode}, no metadata)"
    return label + (" (bwd)" if "transpose(" in op.op_name else "")


def cost_row(preset: str, topology: str, *, layers: int | None, seq_len: int | None, micro_rows: int,
             chip_name: str, top: int) -> dict:
    chips = 1 if topology == "cpu" else None
    if chips is None:
        from jax.experimental import topologies

        chips = len(topologies.get_topology_desc(topology, "tpu").devices)
    row, config, devices, compiled = compile_table.compile_step(
        preset, topology, mesh_for(preset, chips), "pallas_tpu" if topology != "cpu" else "xla",
        layers=layers, seq_len=seq_len, micro_rows=micro_rows)
    row["chip"] = chip_name
    if compiled is None:
        return row
    peak, bw = CHIPS[chip_name]
    mem = compiled.memory_analysis()
    row["peak_gb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                      + mem.temp_size_in_bytes) / 1e9
    ops = hlo_cost.op_costs(hlo_cost.parse(compiled.as_text()))

    model = DogeConfig.from_dict(config.model.to_dict())
    tokens_per_chip = config.batch_size * config.seq_len / len(devices)
    s_eff = min(config.seq_len, model.keep_window_size)
    attn_fwd = model.num_hidden_layers * 4 * model.num_attention_heads * model.head_dim * s_eff * tokens_per_chip
    calls = row.get("kernel_calls", {})
    fwd_calls = sum(v for k, v in calls.items() if "forward" in k) / model.num_hidden_layers
    kernel_flops = attn_fwd * (3 + max(0.0, fwd_calls - 1)) if calls else 0.0
    kernel_ops = {id(o) for o in ops if o.target == "tpu_custom_call"}

    t = defaultdict(float)
    by_source: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # seconds, bytes, flops
    kernel_bytes = sum(o.total_bytes for o in ops if id(o) in kernel_ops)
    for o in ops:
        f, b = o.total_flops, o.total_bytes
        seconds = max(f / peak, b / bw)
        kind = "kernel" if id(o) in kernel_ops else ("matmul" if o.matmul else "other")
        t[f"{kind}_flops"] += f
        t[f"{kind}_bytes"] += b
        if kind == "kernel":
            continue
        t[f"{kind}_s"] += seconds
        if kind == "other":
            entry = by_source[source(o)]
            entry[0] += seconds
            entry[1] += b
            entry[2] += f
    t["kernel_flops"] = kernel_flops
    t["kernel_s"] = max(kernel_flops / peak, kernel_bytes / bw) if kernel_ops else 0.0
    step_flops = t["matmul_flops"] + t["other_flops"] + t["kernel_flops"]
    step_bytes = t["matmul_bytes"] + t["other_bytes"] + t["kernel_bytes"]
    serial = t["matmul_s"] + t["other_s"] + t["kernel_s"]
    model_flops = flops.flops_per_token(model, config.seq_len) * tokens_per_chip
    worst = sorted(by_source.items(), key=lambda kv: -kv[1][0])[:top]
    return {**row, **{k: float(v) for k, v in t.items()}, "flops": step_flops, "bytes": step_bytes,
            "intensity": step_flops / step_bytes, "ridge": peak / bw, "serial_s": serial,
            "bound_s": max(step_flops / peak, step_bytes / bw), "model_flops": model_flops,
            "mfu_ceiling": model_flops / (peak * max(step_flops / peak, step_bytes / bw)),
            "mfu_serial": model_flops / (peak * serial),
            "top_other": [{"source": k, "seconds": v[0], "bytes": v[1], "flops": v[2], "share": v[0] / serial}
                          for k, v in worst]}


def markdown(rows: list[dict]) -> str:
    out = ["| preset (layers) | slice | mesh | accum | HBM peak GB | TFLOP / chip: matmul + other + kernels | GB / chip: matmul + "
           "other + kernels | FLOP/B (ridge) | bound ms | serial ms: matmul + other + kernels | MFU ceiling "
           "(serial) | largest non-matmul cost (share of serial) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = [f"{r['preset']} ({r.get('layers', '')})", r["chip"] if r["topology"] == "cpu" else r["slice"],
                r["mesh"], str(r.get("grad_accum", ""))]
        if r["status"] != "compiled":
            out.append("| " + " | ".join(head + [f"{r['status']}: {r.get('message', '')}"] + [""] * 7) + " |")
            continue
        top = r["top_other"][0] if r["top_other"] else None
        out.append("| " + " | ".join(head + [
            f"{r['peak_gb']:.2f}",
            f"{r['flops'] / 1e12:.2f}: {r['matmul_flops'] / 1e12:.2f} + {r['other_flops'] / 1e12:.2f} + "
            f"{r['kernel_flops'] / 1e12:.2f}",
            f"{r['bytes'] / 1e9:.1f}: {r['matmul_bytes'] / 1e9:.1f} + {r['other_bytes'] / 1e9:.1f} + "
            f"{r['kernel_bytes'] / 1e9:.1f}",
            f"{r['intensity']:.0f} ({r['ridge']:.0f})",
            f"{r['bound_s'] * 1e3:.0f}",
            f"{r['serial_s'] * 1e3:.0f}: {r['matmul_s'] * 1e3:.0f} + {r['other_s'] * 1e3:.0f} + "
            f"{r['kernel_s'] * 1e3:.0f}",
            f"{r['mfu_ceiling']:.1%} ({r['mfu_serial']:.1%})",
            f"`{top['source']}` {top['share']:.1%}" if top else "none"]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--slices", default=",".join(SLICES), help=f"of {sorted(SLICES)}")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count (quick checks)")
    p.add_argument("--seq", type=int, default=None, help="override the preset's seq_len")
    p.add_argument("--micro-rows", type=int, default=8,
                   help="rows per data-parallel chip per micro-batch (the preset's batch is split into as many "
                        "micro-batches as that needs; every one is counted)")
    p.add_argument("--top", type=int, default=5, help="non-matmul sources listed per row")
    p.add_argument("--dry-run", action="store_true",
                   help="doge_20m, 2 layers, T=256, compiled by XLA:CPU for this host, costed at v5e's figures: "
                        "the script's whole path without libtpu (tests/test_step_cost.py)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    if args.dry_run:
        jobs = [("doge_20m", "cpu", "v5e", "host CPU")]
        args.layers, args.seq = args.layers or 2, args.seq or 256
    else:
        jobs = [(preset, SLICES[s], s.split("-")[0], s) for preset in args.presets.split(",")
                for s in args.slices.split(",")]
    rows = []
    for preset, topology, chip_name, slice_name in jobs:
        row = cost_row(preset, topology, layers=args.layers, seq_len=args.seq, micro_rows=args.micro_rows,
                       chip_name=chip_name, top=args.top)
        row["slice"] = slice_name
        rows.append(row)
        print(markdown([row]).splitlines()[-1], flush=True)
        for item in row.get("top_other", []):
            print(f"    {item['share']:6.1%}  {item['seconds'] * 1e3:8.2f} ms  {item['bytes'] / 1e9:8.2f} GB  "
                  f"{item['source']}", flush=True)
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0 if all(r["status"] == "compiled" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
