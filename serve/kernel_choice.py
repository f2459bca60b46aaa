"""Which kernel multiplies each int8 layer shape at each batch size: measured on this machine at start-up.

The two int8 kernels (`quantize.py`) cross over somewhere between one row and a full batch, and where depends on
the shape, the CPU, its cache and the load: on the 2-core EPYC one run chose w8a8 for Doge-20M's LM head from 2
rows, for gate/up from 8 and for q/k/v from 16, and w8a16 for o_proj and down_proj at every size; another run
moved each crossover by a step. A third candidate is the layer's own float32 weight on MKL ("float", for layers
quantised with `keep_float`, as the server does). On the 2-core Intel Xeon (family 6 model 207, 1 thread, 1 row,
the 8 layers of a Doge-20M shape in turn) float32 took 14-45 us a layer, w8a16 23-48 and w8a8 48-62 from the
cache, and with a step's worth of other weights read in between float32 and w8a16 tied (29-64 against 33-61 us);
from 2-8 rows up float32 won, where the all-int8 server had fallen behind float32. The 32768 x 256 LM head, bound
by its bytes, stays int8 (0.66 ms in w8a16 against 1.32 ms in float32).

So the engine times every candidate on the model's own layers, grouped by shape, at 1, 2, 4, ... rows up to
`--max-batch`, and gives every layer a table (rows -> kernel); a float copy no row count chose is dropped. Each
sample runs the whole group (e.g. all 8 fused q/k/v layers) once, as a decode step reads them, after reading a
buffer as large as all the layers' weights as held plus the step's other weights (`flush_buffer`; under bfloat16,
10 MiB of packed layers around Doge-20M's int8 LM head: weights that fit the cache beside the rest stay cached,
those that do not are timed from memory); samples of the kernels alternate, and the fastest of `repeats`
counts, so a neighbour's burst on a shared box hits both sides alike. Prefill (many rows) uses the largest batch's
choice. The flush makes the measurement slower on big models (Doge-60M on the Xeon: 9 s against 1.9 s without); it
reads at most twice the last-level cache (`flush_cap`), which is as much as evicts anything.

w8a8 costs accuracy that w8a16 does not (its activations are rounded to 8 bits: on the trained tiny Doge of
tests/test_serve_quality.py, top-1 agreement with float32 98.00 % on w8a8 against 99.22 % on w8a16), and where
the two are close its timing moves from one start to the next more than the gap: on the 2-core EPYC, three
starts of the bfloat16 server timed Doge-20M's LM head at 1 row at 269 / 291 / 308 us on w8a16 and 212 / 378 /
408 us on w8a8, so one start in three put the head on w8a8; in the decode step itself (bf16 step at 1 row, 7
interleaved rounds) the w8a8 head was no faster: median step 4.18 / 4.09 ms at 1 / 2 threads against 3.87 / 3.90
on w8a16. So w8a8 is chosen only where it beats w8a16 by more than `W8A8_MARGIN` (`pick`).
"""

from __future__ import annotations

import time

import torch

from . import cpu
from .quantize import ANY_ROWS, Int8Linear, available


FLUSH_CAP = 1 << 30  # bytes of the buffer read between samples, at most (see `flush_cap`)
W8A8_MARGIN = 0.10  # w8a8 must be this much faster than w8a16 to be chosen (see the module docstring)


def row_counts(max_rows: int) -> list[int]:
    """1, 2, 4, ... below `max_rows`, and `max_rows` itself."""
    counts, rows = [], 1
    while rows < max_rows:
        counts.append(rows)
        rows *= 2
    return counts + [max_rows]


def flush_cap() -> int:
    """The most bytes worth reading between samples: twice the last-level cache (reading more evicts nothing
    more), or `FLUSH_CAP` where the cache size is unknown; at most `FLUSH_CAP`."""
    cache = cpu.last_level_cache_bytes()
    return FLUSH_CAP if cache is None else min(FLUSH_CAP, 2 * cache)


def flush_buffer(total_bytes: int) -> torch.Tensor:
    """A float32 buffer of `total_bytes` (at most `flush_cap()`): its `.sum()` before a sample reads as many bytes
    as a decode step reads of its other weights between two uses of one layer."""
    return torch.ones(max(1, min(total_bytes, flush_cap()) // 4))


def fastest_of(runs: dict, repeats: int, before=None) -> dict:
    """{name: best seconds of one call of runs[name]()}: each run once to warm up (first calls build kernels and
    fill caches), then `repeats` rounds alternating between them, `before()` (if given) ahead of every sample and
    outside its time. Shared with linear_choice.py."""
    best = {name: float("inf") for name in runs}
    for run in runs.values():
        if before is not None:
            before()
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def pick(best: dict[str, float]) -> str:
    """The kernel to run, from {kernel: seconds}: the fastest, but w8a16 over w8a8 unless w8a8 is more than
    `W8A8_MARGIN` faster."""
    fastest = min(best, key=best.__getitem__)
    if fastest == "w8a8" and best.get("w8a16", float("inf")) <= best["w8a8"] * (1 + W8A8_MARGIN):
        return "w8a16"
    return fastest


@torch.inference_mode()
def choose(layers: list[Int8Linear], max_rows: int, repeats: int = 5,
           other_bytes: int = 0) -> dict[tuple[int, int], list[tuple[int, str]]]:
    """Measure, set every layer's table, and return {(out, in) shape: table}. "float" is a candidate for a shape
    whose layers all hold their float weight (`keep_float`). other_bytes: what a step reads besides `layers`
    (the bfloat16 server's packed weights around its int8 LM head), read between samples too."""
    groups: dict[tuple[int, int], list[Int8Linear]] = {}
    for layer in layers:
        groups.setdefault((layer.out_features, layer.in_features), []).append(layer)
    # the bytes the layers hold now: float32 where the float weight is kept (an upper bound on what a step reads)
    flush = flush_buffer(other_bytes + sum(layer.out_features * layer.in_features
                                           * (4 if layer.float_weight is not None else 1) for layer in layers))
    g = torch.Generator().manual_seed(0)  # not the global RNG: a seeded run's stream must not move
    tables = {}
    for shape, group in groups.items():
        kernels = available() + (("float",) if all(layer.float_weight is not None for layer in group) else ())
        table: list[tuple[int, str]] = []
        for rows in row_counts(max_rows):
            x = torch.randn(rows, shape[1], generator=g)
            best = fastest_of({k: lambda k=k: [layer.run(x, k) for layer in group] for k in kernels}, repeats,
                              before=flush.sum)
            fastest = pick(best)
            if table and table[-1][1] == fastest:
                table[-1] = (rows, fastest)
            else:
                table.append((rows, fastest))
        table[-1] = (ANY_ROWS, table[-1][1])
        for layer in group:
            layer.set_table(table)
            layer.drop_unused_float()
        tables[shape] = table
    return tables


def describe(tables: dict[tuple[int, int], list[tuple[int, str]]]) -> str:
    """'[512x256] <=2 rows float, more w8a8; ...' for the log ("float": the layer's float32 weight kept)."""
    def one(table):
        return ", ".join(f"{'<=' + str(r) + ' rows' if r < ANY_ROWS else 'more'} {k}" for r, k in table)

    return "; ".join(f"[{o}x{i}] {one(t)}" for (o, i), t in tables.items())
