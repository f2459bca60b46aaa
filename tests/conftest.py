"""One XLA compilation cache for the whole test session, shared by its workers and every process they start.

Many tests start `python -m doge_jax.train`, `doge_jax.eval` or a notebook on the same tiny configs, and each
process compiled the same train step again: a 20-step doge_tiny run took 26.6 s, 15.7 s once the compiled
programs came from jax's persistent cache (2-core Xeon). The cache is a fresh folder per session (its first
compile of each program is real), removed at the end; a test that sets JAX_COMPILATION_CACHE_DIR itself keeps
its own, and a caller's JAX_COMPILATION_CACHE_DIR is left alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_OWNED = "DOGE_TEST_XLA_CACHE_OWNED"


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
