"""Micro-batches chosen to fit the device: the train step compiled, its memory read, the fewest that fit.

`config.grad_accum_steps = "auto"` (every preset's default): before step 1 the Trainer compiles its step (ahead of
time, the executable it then runs) and reads the compiler's `memory_analysis()`: the per-device peak of the
step, arguments + outputs − donated + temporaries. It compares that with the device's memory less a margin and
takes the smallest number of micro-batches A (a divisor of batch_size that keeps each micro-batch divisible by
the data-parallel devices and the data shards) whose step fits:

1. A = the smallest candidate (usually 1, the whole batch at once). Fits: done, one compile, as before.
2. Else A = the largest (one sequence per data-parallel device). Does not fit: nothing can; stop before step 1
   with one line naming the need, the limit and the levers (`DoesNotFit`, exit 2).
3. Else the peak is close to linear in the rows of a micro-batch (activations and logits chunks scale with
   them; parameters, optimizer state and gradients do not), so the two compiles predict the smallest A that
   fits; that A is compiled and checked, stepping to the next candidate while it does not fit, then to the
   next smaller one while that fits too (the line may overestimate): the result is the fewest that fit.

The device's memory: `device.memory_stats()["bytes_limit"]` on an accelerator (what the allocator may hand
out), the host's available RAM divided among its local devices on a CPU, or `config.memory_limit_gb`. The
margin (MARGIN) leaves room for what the step's analysis does not count: allocator fragmentation, the next
batch being placed while a step runs, eval and checkpoint copies, and on a CPU the process itself (Python, the
data pipeline). Accumulation does not change the step's mathematics beyond float rounding (micro-batches are
weighted by their target tokens; trainer/step.py), and the rows of a step do not depend on A (batches.py), so
a run resumed on a machine that chooses another A continues the same run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import jax

GB = 1e9
# Fraction of the device's memory kept free. CPU: the process's own memory (Python, jax, the data pipeline;
# ~1-2 GB) and glibc's arena are not in the step's analysis; measured RSS of a doge_20m step was within
# MARGIN of the analysis' peak (README memory section).
MARGIN = {"cpu": 0.20, "accelerator": 0.10}


class DoesNotFit(ValueError):
    """Even one sequence per data-parallel device does not fit: one line with the need, limit and levers."""


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    limit: int  # bytes per device, before the margin
    margin: float
    source: str  # where `limit` came from, for the log line

    @property
    def usable(self) -> int:
        return int(self.limit * (1.0 - self.margin))


def _host_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    pages = os.sysconf("SC_AVPHYS_PAGES")
    return pages * os.sysconf("SC_PAGE_SIZE")


def device_memory(devices, memory_limit_gb: float = 0.0) -> DeviceMemory:
    """The memory one device of `devices` (a mesh's, all alike) may use, the smallest over the processes."""
    device = devices[0]
    cpu = device.platform == "cpu"
    margin = MARGIN["cpu" if cpu else "accelerator"]
    if memory_limit_gb > 0:
        limit, source = int(memory_limit_gb * GB), f"config.memory_limit_gb={memory_limit_gb:g}"
    elif cpu:
        local = sum(1 for d in devices if d.process_index == jax.process_index())
        limit = _host_available_bytes() // max(local, 1)
        source = f"available RAM / {local} local CPU device{'s' if local > 1 else ''}"
    else:
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            raise DoesNotFit(f"config.grad_accum_steps='auto' cannot read the memory of {device.device_kind} "
                             "(no memory_stats()['bytes_limit']): set config.memory_limit_gb or an integer "
                             "config.grad_accum_steps")
        limit, source = int(stats["bytes_limit"]), f"{device.device_kind} allocator limit"
    if jax.process_count() > 1:  # every process must make the same choice: the tightest host decides
        from jax.experimental import multihost_utils
        import numpy as np

        # In whole MiB: process_allgather goes through jax arrays, which hold int32 unless x64 is on, and a byte
        # count over 2 GiB wrapped (a 24 GB host read as -0.8 GB and refused every micro-batch).
        mib = multihost_utils.process_allgather(np.asarray(limit >> 20, np.int32))
        limit = int(np.min(np.asarray(mib, np.int64))) << 20
    return DeviceMemory(limit=limit, margin=margin, source=source)


def step_peak(compiled) -> int:
    """Per-device peak bytes of a compiled step: arguments + outputs − donated (aliased) + temporaries."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def step_fixed(compiled) -> int:
    """The part of step_peak that does not grow with the micro-batch: the state and its outputs (no temporaries)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def candidates(batch_size: int, row_multiple: int) -> list[int]:
    """Micro-batch counts A, ascending, whose micro-batch (batch_size / A rows) is a multiple of row_multiple."""
    return [a for a in range(1, batch_size + 1) if batch_size % a == 0 and (batch_size // a) % row_multiple == 0]


@dataclasses.dataclass
class Choice:
    num_micro: int
    peak: int  # bytes per device of the chosen step
    compiled: object  # its executable
    measured: dict[int, int]  # every A compiled → its peak
    fixed: int = 0  # step_fixed of the chosen step: the peak's intercept when only one point was measured

    def predict(self, num_micro: int, batch_size: int) -> int:
        """The peak at num_micro from a line through the measured points (one point: through `fixed` at 0 rows)."""
        points = sorted((batch_size // a, p) for a, p in self.measured.items())
        if len(points) < 2:
            points = [(0, self.fixed)] + points
        (r0, p0), (r1, p1) = points[0], points[-1]
        slope = (p1 - p0) / (r1 - r0)
        return int(p0 + slope * (batch_size // num_micro - r0))


def choose(compile_step: Callable[[int], object], *, batch_size: int, row_multiple: int, memory: DeviceMemory,
           data_parallel: int) -> Choice:
    """The fewest micro-batches whose compiled step fits `memory.usable`; compile_step(A) → compiled executable."""
    cands = candidates(batch_size, row_multiple)
    measured: dict[int, int] = {}
    executables: dict[int, object] = {}

    def compile_at(a: int) -> int:
        executables[a] = compile_step(a)
        measured[a] = step_peak(executables[a])
        return measured[a]

    def chosen(a: int) -> Choice:
        return Choice(num_micro=a, peak=measured[a], compiled=executables[a], measured=dict(measured),
                      fixed=step_fixed(executables[a]))

    if compile_at(cands[0]) <= memory.usable:
        return chosen(cands[0])
    last = cands[-1]
    if len(cands) == 1 or compile_at(last) > memory.usable:
        need = measured[last]
        rows = batch_size // last // data_parallel
        raise DoesNotFit(
            f"config.grad_accum_steps='auto': even {rows} sequence{'s' if rows > 1 else ''} per device "
            f"({last} micro-batches of {batch_size // last}) needs {gb(need)} GB per device, over the "
            f"{gb(memory.usable)} GB usable ({memory.source}: {gb(memory.limit)} GB, less "
            f"{memory.margin:.0%}); use more devices or config.mesh.fsdp, config.model.remat_policy='attention' "
            "(recompute the projections, keep the attention) or 'full', or a shorter config.seq_len")
    # Predict from the two points, then confirm; each miss moves to the next candidate (its compile measures).
    guess = Choice(0, 0, None, measured)
    order = [a for a in cands if a not in measured]
    start = next((a for a in order if guess.predict(a, batch_size) <= memory.usable), last)
    fits = next(a for a in [a for a in order if a >= start] + [last]
                if (measured[a] if a in measured else compile_at(a)) <= memory.usable)
    # The line may overestimate: while the next smaller count fits too, take it (the fewest that fit).
    smaller = [a for a in cands if a < fits and a not in measured]
    while smaller and compile_at(smaller[-1]) <= memory.usable:
        fits = smaller.pop()
    return chosen(fits)


def suggest(choice: Choice, batch_size: int, row_multiple: int, limit: int) -> int | None:
    """After a real out-of-memory with `choice`: the smallest larger count predicted to need at most 80 % of the
    memory that was really there, min(limit, the failed step's peak): the step failed, so less was free than
    its peak. None when no larger count exists."""
    larger = [a for a in candidates(batch_size, row_multiple) if a > choice.num_micro]
    target = 0.8 * min(limit, choice.peak)
    return next((a for a in larger if choice.predict(a, batch_size) <= target), larger[-1] if larger else None)


def gb(n: int) -> str:
    """Bytes as GB with enough digits to tell small steps apart (tiny configs use MB)."""
    x = n / GB
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.4f}"


def describe(choice: Choice, *, batch_size: int, data_parallel: int, memory: DeviceMemory, auto: bool) -> str:
    """The one line the Trainer prints."""
    rows = batch_size // choice.num_micro
    per_device = rows / data_parallel
    shown = f"{per_device:g}" if per_device == math.floor(per_device) else f"{per_device:.2f}"
    how = "chosen to fit" if auto else "config.grad_accum_steps"
    return (f"micro-batches: {choice.num_micro} of {shown} sequence{'s' if per_device != 1 else ''} per device "
            f"({how}; peak {gb(choice.peak)} of {gb(memory.usable)} GB per device usable, measured from "
            f"the compiled step; {memory.source}: {gb(memory.limit)} GB less {memory.margin:.0%})")
