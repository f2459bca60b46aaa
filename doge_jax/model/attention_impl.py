"""Which implementation of Dynamic Mask Attention runs: the one place that decides, from `attention_impl`.

    "xla"         the reference (`dma_reference`): [B, N, T, S] scores and masks, any input.
    "pallas_gpu"  the Triton kernel (`doge_jax.kernels.gpu_dma`); interpret mode off a GPU.
    "pallas_tpu"  the Mosaic TPU kernel (`doge_jax.kernels.tpu_dma`); TPU interpret mode off a TPU.
    "pallas"      the kernel of the current backend (GPU → pallas_gpu, TPU → pallas_tpu; none on CPU).
                  The backend is `doge_jax.kernels.target.backend()`: jax's, or the platform being lowered for
                  inside `target.lowering_for(...)` (lowering for a TPU or GPU from a CPU host).
    "auto"        the backend's kernel where it can take the call, else the reference.

A named kernel either runs or raises a one-line ValueError saying why (dropout, decoding with a traced cache
offset, tiles the hardware cannot take, ...). Only "auto" falls back, and it logs once per layer, through
absl.logging, which implementation the layer got and why. Under a device mesh (`jax.set_mesh`) a kernel runs
inside shard_map (`doge_jax.parallel.attention`), since XLA cannot partition a Pallas call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from absl import logging

from doge_jax.kernels import gpu_dma, target, tpu_dma
from doge_jax.model import dma_chunked, dma_reference
from doge_jax.model.mask import MaskSpec
from doge_jax.parallel import attention as sharded

_BACKEND_KERNEL = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


@dataclasses.dataclass(frozen=True)
class Choice:
    impl: str  # "xla", "pallas_gpu" or "pallas_tpu"
    reason: str


def _unsupported(kernel: str, q, k, dt, mask: MaskSpec, dropout_rate: float) -> str | None:
    if kernel == "pallas_gpu":
        return gpu_dma.gpu_unsupported_reason(q, k, dt, mask, dropout_rate=dropout_rate)
    return tpu_dma.tpu_unsupported_reason(q, k, dt, mask, dropout_rate=dropout_rate)


def choose(requested: str, q, k, dt, mask: MaskSpec, *, dropout_rate: float = 0.0,
           backend: str | None = None, mesh=None) -> Choice:
    """The implementation for one call (static facts only: shapes, whether the offset is traced, dropout, and
    the mesh the call runs under, whose tensor axis must divide the kv heads for a kernel)."""
    backend = backend or target.backend()
    if requested == "xla":
        return Choice("xla", "attention_impl='xla'")
    if requested in ("pallas_gpu", "pallas_tpu"):
        kernel = requested
    elif requested in ("pallas", "auto"):
        kernel = _BACKEND_KERNEL.get(backend)
        if kernel is None:
            if requested == "auto":
                return Choice("xla", f"no DMA kernel for backend {backend!r}")
            raise ValueError(f"attention_impl='pallas' has no kernel for backend {backend!r}; use 'pallas_gpu' or "
                             "'pallas_tpu' (interpret mode), 'auto' or 'xla'")
    else:
        raise ValueError(f"attention_impl={requested!r} must be one of 'auto', 'xla', 'pallas', 'pallas_gpu', "
                         "'pallas_tpu'")
    reason = _unsupported(kernel, q, k, dt, mask, dropout_rate)
    if reason is None and mesh is not None and not mesh.empty and mesh.size > 1:
        reason = sharded.mesh_unsupported_reason(q, k, mesh)
        if reason is None and kernel == "pallas_tpu" and backend != "tpu":
            # jax 0.10's TPU interpreter waits forever inside shard_map over several CPU devices: refuse, not hang
            reason = f"in TPU interpret mode on a {mesh.size}-device mesh (interpret mode runs on one device)"
    if reason is None and requested == "auto" and kernel == "pallas_gpu" and backend == "gpu" \
            and q.dtype == jnp.float32:
        # Compiled for sm_90, the fp32 kernel's exact dots spill 27-56 KB of registers per thread
        # (benchmarks/gpu_compile_table.py): correct, but no faster than the reference. A caller may still name it.
        reason = "float32 q/k/v on a GPU (its exact fp32 dots spill registers on sm_90; bfloat16 runs the kernel)"
    if reason is None:
        return Choice(kernel, f"attention_impl={requested!r} on {backend}")
    if requested == "auto":
        return Choice("xla", f"{kernel} cannot run {reason}")
    raise ValueError(f"attention_impl={requested!r} cannot run {reason}; use 'auto' (falls back to the XLA "
                     "reference) or 'xla'")


_LOGGED: set[tuple] = set()  # (layer, impl, reason) already logged: a layer traced again logs nothing new


def log_choice(layer: int | None, requested: str, choice: Choice) -> None:
    key = (layer, requested, choice)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logging.info("DMA layer %s: attention_impl=%r runs %s (%s)", "?" if layer is None else layer, requested,
                     choice.impl, choice.reason)


def resolved_remat(remat_policy: str, impl: str, backend: str | None = None) -> str:
    """remat_policy with "auto" made concrete: "scores" where the attention is the XLA reference (no kernel for
    this backend, or impl='xla'), whose [B, N, T, S] tensors would otherwise be kept for every layer; "none" where
    a kernel keeps O(B·N·T) and recomputing would only cost time."""
    if remat_policy != "auto":
        return remat_policy
    backend = backend or target.backend()
    kernel = impl != "xla" and (impl in ("pallas_gpu", "pallas_tpu") or backend in _BACKEND_KERNEL)
    return "none" if kernel else "scores"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, dt: jax.Array, mask: MaskSpec, *, scale: float,
              impl: str = "auto", dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
              layer: int | None = None, recompute_scores: bool = False) -> jax.Array:
    """Dynamic Mask Attention by `impl`. q [B, T, N, H], k/v [B, S, K, H], dt [B, G, S] → [B, T, N, H].

    recompute_scores (remat_policy "scores"): when the XLA reference runs, run it over chunks of queries that the
    backward pass recomputes (`dma_chunked`): its [B, N, T, S] tensors are never all kept."""
    mesh = jax.sharding.get_abstract_mesh()
    choice = choose(impl, q, k, dt, mask, dropout_rate=dropout_rate if dropout_rng is not None else 0.0, mesh=mesh)
    log_choice(layer, impl, choice)
    if choice.impl == "xla":
        reference = dma_chunked.dma_reference_chunked if recompute_scores else dma_reference.dma_reference
        return reference(q, k, v, dt, mask, scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    entry = gpu_dma.dma_pallas_gpu if choice.impl == "pallas_gpu" else tpu_dma.dma_pallas_tpu

    def kernel(q, k, v, dt, mask):
        return entry(q, k, v, dt, mask, scale=scale)

    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, dt, mask)
    return sharded.sharded_kernel(kernel, q, k, v, dt, mask, mesh)
