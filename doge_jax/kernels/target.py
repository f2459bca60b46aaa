"""Which platform the kernels are traced for: the backend, or the platform a lowering targets.

A Pallas kernel decides at trace time how to lower: Triton or Mosaic when the backend is its accelerator,
interpret mode (plain HLO) otherwise. That decision reads `backend()` here and nowhere else. By default it is
`jax.default_backend()`; to lower for an accelerator this host does not have, trace inside `lowering_for`:

    with kernels.target.lowering_for("cuda"), jax.set_mesh(mesh):
        lowered = jax.jit(step).trace(state, batch).lower(lowering_platforms=("cuda",))

and the kernels emit their real custom calls (Triton's `__gpu$xla.gpu.triton`, Mosaic's `tpu_custom_call`)
instead of interpret mode. What is traced there cannot run on this host: trace a fresh `jax.jit` object inside
the context (jit caches a trace by function and arguments, not by this setting).

For a GPU on a host without one, `lowering_for` also names the GPU that Pallas' Triton lowering targets
(`compat.abstract_gpu`: an H200, sm_90; jax >= 0.11 refuses to lower without one).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

from doge_jax.kernels import compat

# jax's lowering platform names → the backend name the kernels compare against (jax.default_backend() spelling).
_PLATFORMS = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("doge_jax_kernel_target", default=None)


def backend() -> str:
    """The backend kernels are traced for: 'gpu', 'tpu' or 'cpu' (`lowering_for`'s, else jax.default_backend())."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[None]:
    """Trace kernels for `platform` ('cuda', 'rocm', 'gpu', 'tpu' or 'cpu') instead of this host's backend."""
    if platform not in _PLATFORMS:
        raise ValueError(f"lowering_for(platform={platform!r}): must be one of {sorted(_PLATFORMS)}")
    backend_ = _PLATFORMS[platform]
    token = _TARGET.set(backend_)
    try:
        if backend_ == "gpu" and jax.default_backend() != "gpu":
            with compat.abstract_gpu():
                yield
        else:
            yield
    finally:
        _TARGET.reset(token)
