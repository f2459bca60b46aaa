"""The micro checks behind `benchmarks/bench_serve.py`'s flags: the hand-written decode step against
`torch.compile` of it (`--compile-check`), the float32 weight layouts (`--layout-check`), and torch's thread count
with OpenMP spinning or waiting passively (`--threads-check`). Each prints one line per setting with the CPU and
the load average."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compile_check(hf_dir: Path, tokens: int, variant: str = "bf16") -> None:
    """The static decode step eager against `compile=True` (serve/compiled.py), one thread, set up as the server
    sets up `variant`: "bf16" (bfloat16 layers, the int8 LM head), "int8" (every linear int8 with its float copy,
    the kernel tables measured once, on the eager side, and given to both) or "fp32"; the same linear kinds on both
    sides (measured once, on the eager one), batch 1 and batch 8, `tokens` tokens each; with the compile time and
    whether both gave the same greedy tokens."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from serve import kernel_choice
    from serve.decode_step import DecodeStep
    from serve.kv_batch import KVBatch
    from serve.quantize import Int8Linear, quantize_head, quantize_linears
    from serve.static_cache import SlotBatch

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    if variant == "int8":
        quantize_linears(model, keep_float=True)
    elif variant == "bf16":
        quantize_head(model)
    twin = copy.deepcopy(model)
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    eager = DecodeStep(model, dtype=dtype, rows=(1, 8))
    compiled = DecodeStep(twin, dtype=dtype, kinds=eager.kinds, compile=True)

    def int8_layers(step, m) -> list:
        return [x for x in m.modules() if isinstance(x, Int8Linear)] + step.fused_layers(Int8Linear)

    tables = ""
    if int8_layers(eager, model):  # as the server's warm-up does, before the first step compiles
        tables = "; int8 " + kernel_choice.describe(kernel_choice.choose(int8_layers(eager, model), 8,
                                                                         other_bytes=eager.float_weight_bytes()))
        for a, b in zip(int8_layers(eager, model), int8_layers(compiled, twin), strict=True):
            b.set_table(a.table)
            b.drop_unused_float()

    def run(step, m, rows: int) -> tuple[float, list[int]]:
        batch = SlotBatch(step, slots=rows, max_len=tokens + 8)
        prefill, logits = KVBatch(m).prefill([[5 + r, 7, 11] for r in range(rows)])
        batch.merge(prefill)
        token = [int(t) for t in logits.argmax(-1)]
        out = []
        t0 = time.perf_counter()
        for _ in range(tokens):
            token = [int(t) for t in batch.decode(token).argmax(-1)]
            out.append(token[0])
        return (time.perf_counter() - t0) / tokens * 1e3, out

    t0 = time.perf_counter()
    for rows in (1, 8):
        run(compiled, twin, rows)
    compile_s = time.perf_counter() - t0
    for rows in (1, 8):
        e = [run(eager, model, rows) for _ in range(3)]
        c = [run(compiled, twin, rows) for _ in range(3)]
        e_ms, c_ms = statistics.median(r[0] for r in e), statistics.median(r[0] for r in c)
        print(f"compile check ({hf_dir.name}, {variant}, batch {rows}, 1 thread, {tokens} tokens, load "
              f"{os.getloadavg()[0]:.1f}): eager step {e_ms:.2f} ms, compiled {c_ms:.2f} ms -> {e_ms / c_ms:.2f}x "
              f"(compiling both batch classes took {compile_s:.0f} s; same greedy tokens: {e[0][1] == c[0][1]})"
              f"{tables if rows == 1 else ''}", flush=True)


def layout_check(hf_dir: Path, threads: int) -> None:
    """Small-batch float32 linears three ways: MKL on the row-major weight (F.linear as transformers has it), MKL
    on a column-major copy (W^T contiguous), and oneDNN on its packed layout (serve/packed_linear.py, the static
    path's default): per weight shape of the model at batch 1 and 8, streaming through enough copies to leave the
    cache as a decode step does; then the whole decode step each way at batch 1 and 8; at 1 and `threads` torch
    threads."""
    import torch
    from transformers import AutoModelForCausalLM

    from serve import packed_linear
    from serve.decode_step import DecodeStep
    from serve.kv_batch import KVBatch
    from serve.static_cache import SlotBatch

    def timed(fn, n) -> float:
        for i in range(n):
            fn(i)
        t0 = time.perf_counter()
        for _ in range(3):
            for i in range(n):
                fn(i)
        return (time.perf_counter() - t0) / (3 * n) * 1e3

    def step_ms(layout: str, rows: int) -> float:
        model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        step = DecodeStep(model, packed=layout == "packed")
        if layout == "row":  # undo the column-major layout: the same step on contiguous [O, I] weights
            for lay in step.layers:
                for fused in (lay.qkv, lay.gate_up):
                    fused.weight = fused.weight.contiguous()
                for linear in (lay.attn.o_proj, lay.layer.mlp.down_proj):
                    linear.weight = torch.nn.Parameter(linear.weight.detach().contiguous(), requires_grad=False)
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().contiguous(), requires_grad=False)
        batch = SlotBatch(step, rows, 512)
        prefill, logits = KVBatch(model).prefill([list(range(5 + r, 40 + r)) for r in range(rows)])
        batch.merge(prefill)
        tokens = [int(t) for t in logits.argmax(-1)]
        return timed(lambda _: batch.decode(tokens), 40)

    config = AutoModelForCausalLM.from_pretrained(hf_dir).config
    D, F_ = config.hidden_size, config.intermediate_size
    H = getattr(config, "head_dim", None) or D // config.num_attention_heads
    shapes = {"qkv": ((config.num_attention_heads + 2 * config.num_key_value_heads) * H, D), "o_proj": (D, D),
              "gate_up": (2 * F_, D), "down": (D, F_), "lm_head": (config.vocab_size, D)}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        for rows in (1, 8):
            cells = []
            with torch.inference_mode():
                for name, (O, I) in shapes.items():
                    n = max(4, int(200e6 / (O * I * 4)))
                    dense = [torch.randn(O, I) for _ in range(n)]
                    cols = [w.t().contiguous().t() for w in dense]
                    x = torch.randn(rows, I)
                    r = timed(lambda i: torch.nn.functional.linear(x, dense[i]), n)
                    c = timed(lambda i: torch.nn.functional.linear(x, cols[i]), n)
                    cell = f"{name} [{O},{I}] {r * 1e3:.0f}/{c * 1e3:.0f}"
                    if packed_linear.available():
                        del cols
                        packed = [packed_linear.PackedLinear(w, None) for w in dense]
                        cell += f"/{timed(lambda i: packed[i](x), n) * 1e3:.0f}"
                    cells.append(cell + " us")
            layouts = ["row", "column"] + (["packed"] if packed_linear.available() else [])
            steps = {layout: step_ms(layout, rows) for layout in layouts}
            print(f"layout check ({hf_dir.name}, {t} thread(s), batch {rows}), {'/'.join(layouts)}: "
                  + "; ".join(cells) + "; decode step " + " / ".join(f"{v:.2f}" for v in steps.values())
                  + f" ms ({steps['row'] / min(steps.values()):.2f}x best vs row-major)", flush=True)


# Runs in a fresh interpreter: OMP_WAIT_POLICY is read once, when torch loads libgomp.
_STEP_TIMER = r"""
import statistics, sys, time, torch
from transformers import AutoModelForCausalLM
from serve.engine import Engine
from serve.kv_batch import KVBatch
from serve.static_cache import SlotBatch
hf_dir, threads, variant, rows_list = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
engine = Engine(model, None, max_batch=16, threads=threads, dtype="float32" if variant == "fp32" else "bfloat16",
                quantize="int8" if variant == "int8" else None)
out = []
for rows in map(int, rows_list.split(",")):
    batch = SlotBatch(engine._step, rows, 512)
    prefill, logits = KVBatch(model).prefill([list(range(5 + r, 40 + r)) for r in range(rows)])
    batch.merge(prefill)
    tokens = [int(t) for t in logits.argmax(-1)]
    for _ in range(5):
        batch.decode(tokens)
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            batch.decode(tokens)
        samples.append((time.perf_counter() - t0) / 10 * 1e3)
    out.append(f"{statistics.median(samples):.2f}")
print(" ".join(out))
"""


def threads_check(hf_dir: Path, variants: list[str], rows: list[int], repeats: int = 3) -> None:
    """The static decode step (no HTTP) at 1 torch thread and at every core, with OpenMP's default spinning and
    with passive waits (what `python -m serve` sets), per dtype; settings interleaved, medians of `repeats`."""
    from serve import cpu

    cores = cpu.cores()
    settings = [(t, policy, v) for v in variants for t in sorted({1, cores}) for policy in ("spin", "passive")]
    results: dict[tuple, list[list[float]]] = {s: [] for s in settings}
    loads = []
    for _ in range(repeats):
        for threads, policy, variant in settings:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **({"OMP_WAIT_POLICY": "PASSIVE"}
                                                                       if policy == "passive" else {}))
            out = subprocess.run([sys.executable, "-c", _STEP_TIMER, str(hf_dir), str(threads), variant,
                                  ",".join(map(str, rows))], env=env, cwd=REPO, capture_output=True, text=True,
                                 timeout=900)
            if out.returncode:
                raise SystemExit(f"threads check {threads, policy, variant} failed:\n{out.stderr[-3000:]}")
            results[threads, policy, variant].append([float(v) for v in out.stdout.split()])
            loads.append(os.getloadavg()[0])
    print(f"threads check ({hf_dir.name}; {cpu.describe()}; load {min(loads):.1f}-{max(loads):.1f}): decode step ms "
          f"at {'/'.join(map(str, rows))} rows, medians of {repeats}", flush=True)
    for (threads, policy, variant), samples in results.items():
        medians = [statistics.median(s[i] for s in samples) for i in range(len(rows))]
        print(f"  {variant:5s} {threads} thread(s), OpenMP {policy:7s}: " + " / ".join(f"{m:.2f}" for m in medians),
              flush=True)
