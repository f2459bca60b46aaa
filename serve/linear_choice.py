"""Which kernel runs each float linear shape of the static decode step: measured on this machine at start-up.

Two kernels compute a float linear at decode's small batches:
- "packed": oneDNN on a weight reordered once into its blocked layout, in float32 or bfloat16
  (`packed_linear.py`); the only bf16 kernel, half the bytes a token reads.
- "dense": MKL's float32 GEMM on the weight stored column-major (`dense_layout`).

Which is faster depends on the CPU far more than on the model. On the 2-core AMD EPYC of the first measurements
packed won everywhere (the whole Doge-20M step 3.62 ms packed against 3.88 ms dense in float32, batch 1). On the
2-core Intel Xeon (family 6 model 207, AVX-512 BF16, no AMX exposed) that later ran the same code, torch's
`mkldnn._linear_pointwise` costs ~27 us a call beyond the ~9 us oneDNN itself reports for a 512 x 256 product, so
at 1 thread a Doge-20M q/k/v product takes 36 us packed in bf16 against 6 us dense in float32, while the 32768 x 256
LM head, bound by its bytes, takes 0.81 ms packed bf16 against 1.32 ms dense float32 (each shape timed alone,
hot in cache). So the step times both on every distinct weight shape it
holds, at 1 row and at the engine's largest batch, and gives each shape the kernel with the lower sum of
slowdowns (each row count's time over that row count's best), so batch 1 and a full batch weigh alike. A shape
kept dense under `--dtype bfloat16` stays float32: exact, and slower to read only where the measurement said the
read does not dominate.

The weights timed are random, of the real shapes, as many as the step holds of each (capped at `BYTES_CAP` of
float32 so a big model does not double its memory while measuring), run one after another as a step reads them.
Before every sample a buffer as large as all the step's float32 weights (capped at `kernel_choice.flush_cap()`) is
read once, as the rest of a decode step reads its other weights between two uses of one layer: the weights of a
model that fits the cache stay cached, those of one that does not are timed from memory. Without that, Doge-60M's
shapes were timed from cache one at a time and went dense float32, a step of 24.4 ms at batch 1 on the Xeon (1
thread) against 15.2 ms with the packed bf16 the flushed timing picks. Samples of the two kernels alternate and the
fastest of `repeats` counts, so a neighbour's burst on a shared box hits both alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernel_choice, packed_linear
from .layout import dense_layout

KINDS = ("packed", "dense")
BYTES_CAP = 64 * 2**20  # float32 bytes of random weights timed per shape


@torch.inference_mode()
def choose(shapes: dict[tuple[int, int], int], dtype: torch.dtype, rows: tuple[int, ...],
           repeats: int = 5) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], dict[str, float]]]:
    """shapes: {(out, in): how many layers of that shape a step runs}. Returns ({shape: kind}, {shape: {kind:
    [seconds for all its layers at each of `rows`]}}): the kind whose times over the best at each row count sum
    lowest. "packed" only where this torch has the kernel for `dtype`."""
    kinds = KINDS if packed_linear.available(dtype) else ("dense",)
    total_bytes = sum(out * inp * 4 * count for (out, inp), count in shapes.items())
    flush = kernel_choice.flush_buffer(total_bytes)
    g = torch.Generator().manual_seed(0)  # not the global RNG: a seeded run's stream must not move
    choice, seconds = {}, {}
    for (out, inp), count in shapes.items():
        count = max(1, min(count, BYTES_CAP // (out * inp * 4)))
        weights = [torch.randn(out, inp, generator=g) for _ in range(count)]
        candidates = {}
        if "packed" in kinds:
            layers = [packed_linear.PackedLinear(w, None, dtype) for w in weights]
            candidates["packed"] = [layer.forward for layer in layers]
        dense = [dense_layout(w) for w in weights]
        candidates["dense"] = [lambda x, w=w: F.linear(x, w) for w in dense]
        del weights
        times = {kind: [] for kind in candidates}
        for n in rows:
            x = torch.randn(n, inp, generator=g)
            # the rest of a step's weights pass through the cache before every sample (`flush`)
            best = kernel_choice.fastest_of({kind: lambda ks=ks: [k(x) for k in ks] for kind, ks in candidates.items()},
                                            repeats, before=flush.sum)
            for kind in candidates:
                times[kind].append(best[kind])
        fastest = [min(t[i] for t in times.values()) for i in range(len(rows))]
        slowdown = {kind: sum(t / f for t, f in zip(ts, fastest)) for kind, ts in times.items()}
        choice[(out, inp)] = min(slowdown, key=slowdown.__getitem__)
        seconds[(out, inp)] = times
    return choice, seconds


def describe(choice: dict[tuple[int, int], str], dtype: torch.dtype) -> str:
    """'[32768x256] packed bfloat16; [512x256] dense float32; ...' for the log."""
    name = str(dtype).removeprefix("torch.")
    return "; ".join(f"[{o}x{i}] " + (f"packed {name}" if kind == "packed" else "dense float32")
                     for (o, i), kind in choice.items()) or "none (all int8 layers: their kernels, float32 kept among them, are measured at warm-up)"
