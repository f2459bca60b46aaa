"""A DMA kernel inside shard_map: what lets a Pallas call run on a device mesh.

XLA's SPMD partitioner cannot split a Pallas custom call: given sharded operands it replicates them (an
all-gather of q/k/v over the whole batch onto every device) or refuses. So under a mesh each kernel call runs as
a pure per-shard function: the batch split over the BATCH rule's axes (data, fsdp, expert), the heads over the
HEADS rule's axis (tensor), kv-head aligned so that a shard holds whole GQA groups (query head n = k·R + r lives
with kv head k). Attention is independent per (batch row, kv group), so the body needs no collective.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from doge_jax.model.mask import MaskSpec
from doge_jax.parallel import sharding as sh


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _size(mesh, axes: tuple[str, ...]) -> int:
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def _split_axes(q: jax.Array, mesh) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The mesh axes the batch goes over (the BATCH rule's that divide B) and those the heads go over."""
    batch = _axes(sh.fit_spec(sh.logical_to_spec((sh.BATCH,)), (q.shape[0],), mesh)[0])
    return batch, tuple(a for a in _axes(sh.logical_to_spec((sh.ACT_HEADS,))[0]) if a not in batch)


def mesh_unsupported_reason(q: jax.Array, k: jax.Array, mesh) -> str | None:
    """Why a kernel cannot run per shard of `mesh` (one line), or None: a tensor shard must hold whole kv heads."""
    heads = _split_axes(q, mesh)[1]
    t, K = _size(mesh, heads), k.shape[2]
    if K % t:
        return (f"mesh axis {'·'.join(heads)}={t} does not divide num_key_value_heads={K}: a tensor shard must hold "
                "whole kv heads (choose a tensor size dividing the kv heads)")
    return None


def sharded_kernel(kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array, dt: jax.Array, mask: MaskSpec,
                   mesh) -> jax.Array:
    """kernel(q, k, v, dt, mask) → out, run per shard of `mesh` (an abstract or concrete mesh).

    q [B, T, N, H], k/v [B, S, K, H], dt [B, G, S] (G = K or N), mask arrays [B, ·]; q_offset must be static.
    The batch goes over the BATCH axes that divide it, heads over the tensor axis, which must divide the kv heads.
    """
    reason = mesh_unsupported_reason(q, k, mesh)
    if reason:
        raise ValueError(reason)
    batch, heads = _split_axes(q, mesh)
    b_spec, h_spec = batch or None, heads or None
    arrays = {"kv_mask": mask.kv_mask, "q_segment_ids": mask.q_segment_ids, "kv_segment_ids": mask.kv_segment_ids}
    present = {name: x for name, x in arrays.items() if x is not None}

    def body(q, k, v, dt, extra):
        local = mask.replace(**{name: extra.get(name) for name in arrays})
        return kernel(q, k, v, dt, local)

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(
            P(b_spec, None, h_spec, None),  # q [B, T, N, H]: batch over data/fsdp/expert, query heads over tensor
            P(b_spec, None, h_spec, None),  # k [B, S, K, H]: kv heads over tensor (the same groups as q's heads)
            P(b_spec, None, h_spec, None),  # v [B, S, K, H]
            P(b_spec, h_spec, None),  # dt [B, G, S]: bias heads with their group (G = K or N, both divided by t)
            {name: P(b_spec, None) for name in present},  # kv_mask [B, S], segment ids [B, T] / [B, S]
        ),
        out_specs=P(b_spec, None, h_spec, None),  # out [B, T, N, H]
        check_vma=False,  # Pallas calls carry no varying-mesh-axis annotations
    )
    return fn(q, k, v, dt, present)
