"""How many torch threads each decode step gets: every core, or one, whichever the last steps ran faster on.

Two threads split each product across the cores, but every parallel region (about 40 a Doge-20M step) must wake
the second OpenMP worker, and when the event loop or a neighbour holds that core the whole step waits for it. On
the shared 2-core EPYC one thread won whenever anything else ran: a bf16 Doge-20M step took 6.0 ms on one
thread and 7.0 ms on two at load ~2 (passive OpenMP; `benchmarks/bench_serve.py --threads-check`), and at load
~10 eight streaming clients got 683-914 tok/s on one against 472-767 on two. A box with idle cores is where
the second thread pays. No fixed count is right on a box whose load moves, so the engine times its own steps:
per batch-size class (1, 2-3, 4-7, 8-15, ... rows) it keeps a moving average of the step time under each count,
runs the faster, and every so often tries the other, so a change in load is noticed within a few hundred
milliseconds. How often: every `EXPLORE_EVERY`-th step, or more rarely when the other count is much slower, so that
trying it costs at most `EXPLORE_COST` of the time (at most every `MAX_EXPLORE_EVERY`-th step). Behind an HTTP
client on the 2-core box, a 2-thread step of Doge-20M takes ~5 ms against ~2 ms on one thread (the client and
the event loop hold the second core), and trying it every 32nd step cost ~5 % of one stream's tokens/s. An
explicit `--threads` turns this off.

The estimate of each count is the median of its last `WINDOW` steps, not a moving average: on the 2-core Xeon
(KVM; Doge-60M bf16 step at batch 1, passive OpenMP) single 2-thread steps of 35-85 ms came among ones of 18-23
ms, several a minute (more often the first after a run of 1-thread steps, which wakes the other core's sleeping
worker), and one of them pushed a moving average past the 1-thread time (~25 ms) for a hundred steps or more. In
process, one request then decoded at 17-21 ms a token under the chooser against 12-15 with 2 threads fixed.
"""

from __future__ import annotations

import collections
import math
import statistics

import torch

EXPLORE_EVERY = 32  # steps of one batch-size class between two tries of the count not in use, at least
MAX_EXPLORE_EVERY = 256  # ... and at most
EXPLORE_COST = 0.02  # the share of step time that trying the slower count may cost
WINDOW = 5  # steps per (batch-size class, count) whose median is the estimate


class ThreadChooser:
    def __init__(self, counts: list[int]):
        self.counts = sorted(set(counts))
        self.estimate: dict[tuple[int, int], float] = {}  # (class, threads) -> seconds per step (the median)
        self.samples: dict[tuple[int, int], collections.deque] = {}  # (class, threads) -> its last WINDOW steps
        self.steps: dict[int, int] = {}  # class -> steps seen
        self.explored: dict[int, int] = {}  # class -> the step count at its last try of the slower count
        self.used: dict[int, int] = {c: 0 for c in self.counts}  # threads -> steps run with them
        self.current = torch.get_num_threads()

    @staticmethod
    def size_class(rows: int) -> int:
        return rows.bit_length()

    def interval(self, rows: int) -> int:
        """Steps of `rows`' class between two tries of the slower count: EXPLORE_EVERY, longer when the slower
        count's extra time would exceed EXPLORE_COST of the steps in between, at most MAX_EXPLORE_EVERY."""
        k = self.size_class(rows)
        times = sorted(self.estimate[k, c] for c in self.counts if (k, c) in self.estimate)
        if len(times) < 2 or times[0] <= 0:
            return EXPLORE_EVERY
        wanted = (times[1] / times[0] - 1) / EXPLORE_COST
        return int(min(MAX_EXPLORE_EVERY, max(EXPLORE_EVERY, math.ceil(wanted))))

    def choose(self, rows: int) -> int:
        """The thread count for a step of `rows` rows: an untried count first, then once every `interval`
        steps the slower one, otherwise the faster."""
        k = self.size_class(rows)
        n = self.steps.get(k, 0)
        untried = [c for c in self.counts if (k, c) not in self.estimate]
        if untried:
            return untried[0]
        ranked = sorted(self.counts, key=lambda c: self.estimate[k, c])
        if len(ranked) > 1 and n - self.explored.get(k, 0) >= self.interval(rows) - 1:
            self.explored[k] = n + 1
            return ranked[1]
        return ranked[0]

    def record(self, rows: int, threads: int, seconds: float) -> None:
        k = self.size_class(rows)
        self.steps[k] = self.steps.get(k, 0) + 1
        self.used[threads] = self.used.get(threads, 0) + 1
        window = self.samples.setdefault((k, threads), collections.deque(maxlen=WINDOW))
        window.append(seconds)
        self.estimate[k, threads] = statistics.median(window)

    def apply(self, threads: int) -> None:
        if threads != self.current:
            torch.set_num_threads(threads)
            self.current = threads
