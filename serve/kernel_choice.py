"""Which int8 kernel multiplies each layer shape at each batch size: measured on this machine at start-up.

The two int8 kernels (`quantize.py`) cross over somewhere between one row and a full batch, and where depends on
the shape, the CPU, its cache and the load: on the 2-core EPYC one run chose w8a8 for Doge-20M's LM head from 2
rows, for gate/up from 8 and for q/k/v from 16, and w8a16 for o_proj and down_proj at every size; another run
moved each crossover by a step. So the engine times both on the model's own layers, grouped by shape, at 1, 2, 4, ...
rows up to `--max-batch`, and gives every layer a table (rows -> kernel). Each sample runs the whole group (e.g.
all 8 fused q/k/v layers) once, as a decode step reads them; samples of the kernels alternate, and the fastest of
`repeats` counts, so a neighbour's burst on a shared box hits both sides alike. Prefill (many rows) uses the
largest batch's choice.
"""

from __future__ import annotations

import time

import torch

from .quantize import ANY_ROWS, Int8Linear, available


def row_counts(max_rows: int) -> list[int]:
    """1, 2, 4, ... below `max_rows`, and `max_rows` itself."""
    counts, rows = [], 1
    while rows < max_rows:
        counts.append(rows)
        rows *= 2
    return counts + [max_rows]


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


@torch.inference_mode()
def choose(layers: list[Int8Linear], max_rows: int, repeats: int = 5) -> dict[tuple[int, int], list[tuple[int, str]]]:
    """Measure, set every layer's table, and return {(out, in) shape: table}."""
    kernels = available()
    groups: dict[tuple[int, int], list[Int8Linear]] = {}
    for layer in layers:
        groups.setdefault((layer.out_features, layer.in_features), []).append(layer)
    g = torch.Generator().manual_seed(0)  # not the global RNG: a seeded run's stream must not move
    tables = {}
    for shape, group in groups.items():
        table: list[tuple[int, str]] = []
        for rows in row_counts(max_rows):
            x = torch.randn(rows, shape[1], generator=g)
            best = fastest_of({k: lambda k=k: [layer.run(x, k) for layer in group] for k in kernels}, repeats)
            fastest = min(kernels, key=best.__getitem__)
            if table and table[-1][1] == fastest:
                table[-1] = (rows, fastest)
            else:
                table.append((rows, fastest))
        table[-1] = (ANY_ROWS, table[-1][1])
        for layer in group:
            layer.set_table(table)
        tables[shape] = table
    return tables


def describe(tables: dict[tuple[int, int], list[tuple[int, str]]]) -> str:
    """'[512x256] <=2 rows w8a16, more w8a8; ...' for the log."""
    def one(table):
        return ", ".join(f"{'<=' + str(r) + ' rows' if r < ANY_ROWS else 'more'} {k}" for r, k in table)

    return "; ".join(f"[{o}x{i}] {one(t)}" for (o, i), t in tables.items())
