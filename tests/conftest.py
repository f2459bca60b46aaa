"""The test session's shape: one XLA compilation cache for all its processes, and the longest files handed out first.

One XLA compilation cache for the whole test session, shared by its workers and every process they start.

Many tests start `python -m doge_jax.train`, `doge_jax.eval` or a notebook on the same tiny configs, and each
process compiled the same train step again: a 20-step doge_tiny run took 26.6 s, 15.7 s once the compiled
programs came from jax's persistent cache (2-core Xeon). The cache is a fresh folder per session (its first
compile of each program is real), removed at the end; a test that sets JAX_COMPILATION_CACHE_DIR itself keeps
its own, and a caller's JAX_COMPILATION_CACHE_DIR is left alone.

The order: xdist (`--dist loadfile`) hands each of its two workers a file at a time, in collection order, and by
default first sorts the files by their number of tests, which put the notebooks' five tests (396 s together)
among the last files: on the 2-core EPYC the run's last seven minutes had one worker busy and the other done
(1174 s wall for 2187 s of tests). Here the longest files come first (longest-first list scheduling; `LONGEST`,
from `--durations=0` of that run, 2026-12-07), then the rest by test count as xdist would, and pyproject's
addopts turn xdist's own reordering off. Tests within a file keep their order.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile

_OWNED = "DOGE_TEST_XLA_CACHE_OWNED"

# Seconds each took in that run (all its tests together): 396, 150, 142, 113, 103, 96, 96, 91, 81, 72, 63, 60.
LONGEST = ("test_notebooks.py", "test_kernels_tpu.py", "test_fit.py", "test_eval.py", "test_moe_parallel.py",
           "test_mesh_devices.py", "test_train_resume.py", "test_token_scores.py", "test_kernels_mesh.py",
           "test_kernels_dma.py", "test_storage_gcs.py", "test_remat.py")


def pytest_configure(config):
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return  # an xdist worker inherits the controller's environment; a caller's choice stands
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="doge-jax-test-xla-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ[_OWNED] = "1"


def pytest_unconfigure(config):
    if hasattr(config, "workerinput") or not os.environ.pop(_OWNED, None):
        return
    shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR"), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Longest files first, then by test count (most first); a stable sort keyed by file only."""
    counts = collections.Counter(item.path.name for item in items)
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(LONGEST)), -counts[item.path.name], item.path.name))
