"""What differs between the jax versions doge-jax supports (0.10, 0.11, 0.12), in one place.

- A Pallas Triton call lowered for a GPU this host does not have: jax 0.10 targets sm_90 when it finds no GPU;
  jax >= 0.11 raises "No supported GPU devices found, please specify an abstract GPU device using
  AbstractDevice". `abstract_gpu()` makes the lowering target an H200 (sm_90, the GPU this project measures on).
- The Triton IR inside a `__gpu$xla.gpu.triton` custom call is MLIR bytecode written with jaxlib's own copy of
  the Triton dialect (a jax internal). `triton_ir_text` prints it as text, which a `triton` wheel of the matching
  dialect version compiles (`TRITON_FOR_JAX`, measured by benchmarks/gpu_compile_table.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax

ABSTRACT_GPU_KIND = "NVIDIA H200"  # compute capability 9.0 in Pallas' table (pallas/triton/gpu_info.py)

# The jax minor version → the triton wheel whose compiler reads the IR that version's Pallas emits (the text of
# `triton_ir_text`) and whose ptxas assembles it for sm_90. Measured 2026-12 (benchmarks/gpu_compile_table.py):
# triton 3.4.0, 3.5.1 and 3.6.0 read jax 0.10.2's IR, 3.6.0 and 3.7.1 read 0.11.2's and 0.12.0.1's; 3.9.0 reads
# them but writes PTX 9.4, which its own sm_90 ptxas (PTX 8.8) refuses. 3.6.0 is the H200 image's triton.
# Registers and spills differ between triton versions (one kernel spilled 100 B on 3.4.0, 40 B on 3.5.1, none
# on 3.6.0): the figures are exact for the paired version only.
TRITON_FOR_JAX = {"0.10": "3.6.0", "0.11": "3.6.0", "0.12": "3.6.0"}


def jax_minor(version: str | None = None) -> str:
    """'0.11' for jax 0.11.2 (this jax when `version` is None)."""
    return ".".join((version or jax.__version__).split(".")[:2])


@contextlib.contextmanager
def abstract_gpu(kind: str = ABSTRACT_GPU_KIND) -> Iterator[None]:
    """Pallas' Triton lowering targets a GPU of `kind` while this host's devices are not GPUs.

    jax >= 0.11 looks the target up by the device kind of the abstract mesh in force (`pallas/triton/gpu_info.py`,
    then its `registry` by kind). An abstract mesh naming a GPU (`use_abstract_mesh`) works for a lone kernel, but
    under `jax.set_mesh` jax 0.11.2 then refuses the train step ("Mesh for all inputs should be equal": the
    inputs' mesh names the CPU). So the host's kind is registered as this GPU for the context's duration instead.
    jax 0.10 has no such lookup (it targets sm_90 when it finds no GPU): nothing to do.
    """
    try:
        from jax._src.pallas.triton import gpu_info  # jax internals, 0.11 and 0.12
    except ImportError:
        yield
        return
    host_kind = jax.devices()[0].device_kind
    info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion(kind))
    previous = gpu_info.registry.get(host_kind)
    gpu_info.registry[host_kind] = lambda: info
    try:
        yield
    finally:
        if previous is None:
            del gpu_info.registry[host_kind]
        else:
            gpu_info.registry[host_kind] = previous
        gpu_info.get_gpu_info.cache_clear()  # a lookup cached inside must not answer outside


def triton_ir_text(bytecode: bytes) -> str:
    """The text form of the Triton module serialized in a Pallas Triton custom call's `ir` attribute."""
    from jax._src.interpreters import mlir  # jax internals: the dialect registration is not public API
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect

    context = mlir.make_ir_context()
    dialect.register_dialect(context)
    with context:
        return ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)
