"""The test session's shape: one XLA compilation cache for all its processes, and the longest files handed out first.

The cache is shared by the session's workers and every process they start. Many tests start `python -m
doge_jax.train`, `doge_jax.eval` or a notebook on the same tiny configs, and each process compiled the same train
step again: a 20-step doge_tiny run took 26.6 s, 15.7 s once the compiled
programs came from jax's persistent cache (2-core Xeon). The cache is a fresh folder per session (its first
compile of each program is real), removed at the end; a test that sets JAX_COMPILATION_CACHE_DIR itself keeps
its own, and a caller's JAX_COMPILATION_CACHE_DIR is left alone.

The order: xdist (`--dist loadfile`) hands each of its two workers a file at a time, in collection order, and by
default first sorts the files by their number of tests, which put the notebooks' five tests (396 s together)
among the last files: on the 2-core EPYC the run's last seven minutes had one worker busy and the other done
(1174 s wall for 2187 s of tests). Here the longest files come first (longest-first list scheduling; `SECONDS`,
from `--durations=0`), then the rest by test count as xdist would, and pyproject's
addopts turn xdist's own reordering off. Tests within a file keep their order.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile

_OWNED = "DOGE_TEST_XLA_CACHE_OWNED"

# Seconds of each file's tests together (the larger of two `--durations=0` runs on the 2-core EPYC, 2026-12-07;
# test_serve_compiled: one run with an empty inductor cache, as CI has, plus the two tests added after it), for
# every file of 15 s or more. A new long file belongs here: unlisted files go after these. test_compile_gpu and
# _tpu: their time in .ci/run's extra venvs (skipped in the main suite), where test_compile_gpu's 100 s went last
# and the venv took 150 s wall for 193 s of tests.
SECONDS = {"test_notebooks.py": 396, "test_serve_compiled.py": 170, "test_kernels_tpu.py": 150, "test_fit.py": 142,
           "test_eval.py": 113, "test_moe_parallel.py": 103, "test_mesh_devices.py": 102, "test_compile_gpu.py": 100,
           "test_train_resume.py": 96, "test_token_scores.py": 92, "test_kernels_mesh.py": 81,
           "test_kernels_dma.py": 72, "test_storage_gcs.py": 63, "test_remat.py": 60,
           "test_gpu_check_dry_run.py": 56, "test_train_eval_tasks.py": 50, "test_parity.py": 47,
           "test_model.py": 42, "test_mesh_multiprocess.py": 41, "test_kernels_tpu_sparse.py": 41,
           "test_legacy_layout.py": 38, "test_chain.py": 37, "test_serve_quality.py": 36, "test_train_step.py": 35,
           "test_compile_tpu.py": 29, "test_convert.py": 28, "test_lowering.py": 25,
           "test_sampler.py": 25, "test_serve_loading.py": 24, "test_data_pipeline.py": 21,
           "test_cli_workdir.py": 19, "test_kernels_model.py": 16, "test_moe_continuation.py": 16}


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
    """Longest files first (`SECONDS`), then the others by test count (most first); a stable sort keyed by file
    only."""
    counts = collections.Counter(item.path.name for item in items)
    items.sort(key=lambda item: (-SECONDS.get(item.path.name, 0), -counts[item.path.name], item.path.name))
