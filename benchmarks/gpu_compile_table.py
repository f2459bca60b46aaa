"""Every Triton kernel of the GPU DMA entry, compiled for sm_90 on a CPU host: registers, spills, shared memory.

    python benchmarks/gpu_compile_table.py                              # every gpu_tiles.TABLE entry × case
    python benchmarks/gpu_compile_table.py --heads 128 --cases bf16-topk --json out.json   # one entry, one case

For each case (a gpu_tiles.TABLE entry: head dim and walk; a dtype, GQA ratio R = N/K, one bias per kv head or
per query head, and a mask), `dma_pallas_gpu` forward + vjp is lowered for cuda on this host inside
`doge_jax.kernels.target.lowering_for("cuda")`, with the tiles the dispatcher chooses (nothing overridden). Each
`__gpu$xla.gpu.triton` custom call's Triton module is taken out of the StableHLO (`compat.triton_ir_text`),
compiled by the `triton` wheel's compiler for `GPUTarget("cuda", 90, 32)` with the call's num_warps and
num_stages, and its PTX assembled by the wheel's own ptxas (`ptxas -v --gpu-name=sm_90a`), which reports the
registers and spills; the shared memory is what the compiled kernel asks for at launch (its metadata).

A kernel fails the check when it spills registers or asks for more shared memory than one sm_90 block may have
(227 KB: 228 KB per SM, 1 KB of it reserved); the script then exits 1. Two exceptions, each written where it is
decided: a table entry timed fastest on a GPU despite spilling (`gpu_tiles.Tiles.spills_measured`: at exactly its
tiles, up to that many bytes), and float32 (its exact fp32 dots spill tens of KB; `attention_impl="auto"` runs
the XLA reference for float32 on a GPU, and only a caller naming the kernel gets it, correct and slow). The triton wheel must match jax's Pallas
(`doge_jax.kernels.compat.TRITON_FOR_JAX`). The full XLA:GPU compile of the train step is not done here: see the
kernels README.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from doge_jax.kernels import compat, gpu_tiles, target  # noqa: E402
from doge_jax.kernels.gpu_dma import dma_pallas_gpu  # noqa: E402
from doge_jax.model.mask import MaskSpec  # noqa: E402

SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may opt into on sm_90 (H100/H200)
TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of the GPU entry: the walk (dense or sparse) follows from T and keep_window_size."""

    name: str
    dtype: str  # "bfloat16" or "float32"
    heads_per_kv: int  # R
    bias_per_query_head: bool  # dt [B, N, S] instead of [B, K, S]
    mask: str  # "causal" | "no-topk" | "padding" | "segments" | "window"


# Each case turns on different parts of the kernels (has_thr, has_segments, sliding window, bias rows, fp32 dots).
CASES = {
    "dense": [
        Case("bf16-topk", "bfloat16", 2, False, "causal"),
        Case("bf16-no-topk-R1", "bfloat16", 1, False, "no-topk"),
        Case("bf16-segments-R4-bias/head", "bfloat16", 4, True, "segments"),
        Case("f32-padding", "float32", 2, False, "padding"),
        Case("f32-window-R4-bias/head", "float32", 4, True, "window"),
    ],
    "sparse": [  # segments and windows always take the dense walk
        Case("bf16-topk", "bfloat16", 2, False, "causal"),
        Case("bf16-padding-R4-bias/head", "bfloat16", 4, True, "padding"),
        Case("f32-topk", "float32", 2, False, "causal"),
        Case("f32-padding-R4-bias/head", "float32", 4, True, "padding"),
    ],
}


def inputs(case: Case, head_dim: int, walk: str):
    """Abstract q, k, v, dt and the MaskSpec: T = 512 with a window of 384 (dense walk with the top-k), or T = 1024
    with a window of 256 (S >= 2w: the sparse walk)."""
    t, w = (512, 384) if walk == "dense" else (1024, 256)
    if case.mask == "no-topk":
        w = t
    b, kh = 2, 2
    n = kh * case.heads_per_kv
    dtype = jnp.dtype(case.dtype)
    q = jax.ShapeDtypeStruct((b, t, n, head_dim), dtype)  # [B, T, N, H]
    kv = jax.ShapeDtypeStruct((b, t, kh, head_dim), dtype)  # [B, S, K, H]
    dt = jax.ShapeDtypeStruct((b, n if case.bias_per_query_head else kh, t), jnp.float32)  # [B, G, S]
    pos = jnp.arange(t)
    if case.mask == "padding":
        mask = MaskSpec(keep_window_size=w, kv_mask=pos[None, :] >= jnp.array([[0], [37]]))
    elif case.mask == "segments":
        seg = 1 + (pos[None, :] >= jnp.array([[200], [300]])).astype(jnp.int32)
        mask = MaskSpec(keep_window_size=w, q_segment_ids=seg, kv_segment_ids=seg)
    elif case.mask == "window":
        mask = MaskSpec(keep_window_size=w // 2, sliding_window=w)
    else:
        mask = MaskSpec(keep_window_size=w)
    return (q, kv, kv, dt), mask


def lowered_kernels(case: Case, head_dim: int, walk: str, **overrides) -> list[dict]:
    """The Triton custom calls of forward + vjp, in module order: name, num_warps, num_stages, IR text.
    overrides: num_warps / num_stages passed to the entry instead of the table's (for a sweep)."""
    args, mask = inputs(case, head_dim, walk)

    def step(q, k, v, dt):
        out, pull = jax.vjp(lambda *a: dma_pallas_gpu(*a, mask, scale=head_dim ** -0.5, **overrides), q, k, v, dt)
        return out, pull(out)

    with target.lowering_for("cuda"):
        module = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    from jax._src.lib.mlir import ir  # the attribute classes of jax's own MLIR bindings

    found = []

    def walk_ops(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if (child.operation.name == "stablehlo.custom_call"
                            and ir.StringAttr(child.attributes["call_target_name"]).value == TRITON_CALL):
                        cfg = ir.DictAttr(child.attributes["mhlo.backend_config"])
                        found.append({"kernel": ir.StringAttr(cfg["name"]).value,
                                      "num_warps": ir.IntegerAttr(cfg["num_warps"]).value,
                                      "num_stages": ir.IntegerAttr(cfg["num_stages"]).value,
                                      "ir": compat.triton_ir_text(ir.StringAttr(cfg["ir"]).value_bytes)})
                    walk_ops(child.operation)

    walk_ops(module.operation)
    return found


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_sm90(ir_text: str, num_warps: int, num_stages: int, workdir: str) -> dict:
    """triton → PTX → ptxas -v for sm_90a: registers, spill bytes, shared memory bytes, seconds."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(workdir, hashlib.sha256(ir_text.encode()).hexdigest()[:16] + ".ttir")
    with open(path, "w") as f:
        f.write(ir_text)
    t0 = time.perf_counter()
    kernel = triton.compiler.compile(path, target=GPUTarget("cuda", 90, 32),
                                     options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = path[:-5] + ".ptx"
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    proc = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull], capture_output=True,
                          text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"ptxas exit {proc.returncode}: " + " ".join(log.split())[:300])
    regs, spills = _REGS.search(log), _SPILLS.search(log)
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "shared_bytes": int(kernel.metadata.shared),
            "compile_s": round(time.perf_counter() - t0, 1)}


def verdict(row: dict, spills_accepted: int = 0) -> str | None:
    """Why a compiled kernel fails the check (one line), or None."""
    if max(row["spill_stores"], row["spill_loads"]) > spills_accepted:
        return f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads"
    if row["shared_bytes"] > SM90_SHARED_LIMIT:
        return f"shared memory {row['shared_bytes']} B > {SM90_SHARED_LIMIT} B"
    return None


def rows_for(head_dim: int, walk: str, case: Case, workdir: str, **overrides) -> list[dict]:
    tiles = gpu_tiles.choose(head_dim, sparse=walk == "sparse")
    base = {"head_dim": head_dim, "walk": walk, "case": case.name, "rows": tiles.rows, "block_k": tiles.block_k}
    try:
        kernels = lowered_kernels(case, head_dim, walk, **overrides)
    except ValueError as e:  # the entry refuses the call: one line
        return [{**base, "status": "refused", "message": str(e).splitlines()[0]}]
    out = []
    for k in kernels:
        row = {**base, "kernel": k["kernel"], "num_warps": k["num_warps"], "num_stages": k["num_stages"]}
        try:
            row.update(compile_sm90(k["ir"], k["num_warps"], k["num_stages"], workdir))
        except Exception as e:  # a compiler that refuses the IR: its first line is the finding
            out.append({**row, "status": "compile error", "message": f"{type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:300]}"})
            continue
        if case.dtype == "float32":  # not a default path: "auto" takes the XLA reference for fp32 on a GPU
            spilled = row["spill_stores"] or row["spill_loads"]
            out.append({**row, "status": "fp32", **({"message": "spills (attention_impl='auto' runs the XLA "
                                                                "reference for float32 on a GPU)"} if spilled else {})})
            continue
        accepted = tiles.spills_measured if not overrides else 0  # only at the entry's own (measured) tiles
        why = verdict(row, accepted)
        note = (f"spills {max(row['spill_stores'], row['spill_loads'])} B, accepted: these tiles were timed fastest "
                "on an H200 (gpu_tiles)") if not why and (row["spill_stores"] or row["spill_loads"]) else None
        out.append({**row, "status": "fail" if why else "ok", **({"message": why or note} if why or note else {})})
    return out


def markdown(rows) -> str:
    out = ["| head dim | walk | case | tiles (rows×keys) | kernel | warps | stages | registers | spills (B) | "
           "shared (KB) | result |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spills = f"{r['spill_stores']}/{r['spill_loads']}" if "spill_stores" in r else ""
        shared = f"{r['shared_bytes'] / 1024:.1f}" if "shared_bytes" in r else ""
        result = r["status"] + (f": {r['message']}" if "message" in r else "")
        out.append(f"| {r['head_dim']} | {r['walk']} | {r['case']} | {r['rows']}×{r['block_k']} | "
                   f"{r.get('kernel', '')} | {r.get('num_warps', '')} | {r.get('num_stages', '')} | "
                   f"{r.get('registers', '')} | {spills} | {shared} | {result} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", default=",".join(str(h) for h in sorted({h for h, _ in gpu_tiles.TABLE})),
                   help="head dims (each takes the table's tiles for the nearest measured head dim)")
    p.add_argument("--walks", default="dense,sparse")
    p.add_argument("--cases", default="", help="comma-separated case names (default: every case of the walk)")
    p.add_argument("--table", default="", help="try other tiles: ';'-separated HEAD,WALK=ROWSxBLOCK_K:WARPS:STAGES"
                   "[:DKV_WARPS] entries replacing gpu_tiles.TABLE's for this run")
    p.add_argument("--warps", default="", help="sweep: comma-separated num_warps instead of the table's")
    p.add_argument("--stages", default="", help="sweep: comma-separated num_stages instead of the table's")
    p.add_argument("--json", default="", help="also write the rows here")
    a = p.parse_args(argv)
    for entry in filter(None, a.table.split(";")):
        key, _, tiles = entry.partition("=")
        head, walk = key.split(",")
        shape, *numbers = tiles.split(":")
        rows_, block_k = (int(x) for x in shape.split("x"))
        gpu_tiles.TABLE[int(head), walk] = gpu_tiles.Tiles(rows_, block_k, *(int(x) for x in numbers))
    sweep = [{}]
    if a.warps or a.stages:
        sweep = [{**({"num_warps": int(w)} if w else {}), **({"num_stages": int(st)} if st else {})}
                 for w in (a.warps.split(",") if a.warps else [""]) for st in (a.stages.split(",") if a.stages else [""])]
    import triton

    rows = []
    with tempfile.TemporaryDirectory(prefix="doge-sm90-") as workdir:
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(workdir, "cache"))
        for head_dim in (int(h) for h in a.heads.split(",")):
            for walk in a.walks.split(","):
                for case in CASES[walk]:
                    if a.cases and case.name not in a.cases.split(","):
                        continue
                    for overrides in sweep:
                        for row in rows_for(head_dim, walk, case, workdir, **overrides):
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump({"jax": jax.__version__, "triton": triton.__version__, "rows": rows}, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    paired = compat.TRITON_FOR_JAX.get(compat.jax_minor())
    print(f"\njax {jax.__version__}, triton {triton.__version__} (paired with this jax: {paired}), sm_90a (ptxas of "
          f"the triton wheel)\n")
    print(markdown(rows))
    bad = [r for r in rows if r["status"] not in ("ok", "refused", "fp32")]
    compiled = [r for r in rows if r["status"] != "refused"]
    print(f"\n{len(compiled) - len(bad)} of {len(compiled)} compiled kernels pass (no spill, shared memory <= "
          f"{SM90_SHARED_LIMIT // 1024} KB); {len(rows) - len(compiled)} calls refused by the entry")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
