"""Logical axis names and the ONE table that maps them onto the device mesh.

Modules tag each parameter with logical axis names (`nnx.Param(..., logical_axes=(EMBED, MLP))`); nothing else
in the model knows about devices. The trainer builds a mesh with the axes in `MESH_AXES` and maps logical names
to mesh axes through `RULES`. A logical name absent from RULES (or mapped to None) is replicated.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Mesh axes, outermost first: data parallel, fully-sharded data parallel, tensor parallel, expert parallel.
MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axes of parameters.
VOCAB = "vocab"
EMBED = "embed"  # the model dimension D
MLP = "mlp"  # the feed-forward dimension F
HEADS = "heads"  # N·H, the flattened query heads
KV_HEADS = "kv_heads"  # K·H, the flattened kv heads
DT_HEADS = "dt_heads"  # G, the DMA bias heads (tiny: replicated)
HEAD_DIM = "head_dim"
EXPERTS = "experts"
ROUTER_KEYS = "router_keys"  # 2·num_keys
# Logical axes of activations.
BATCH = "batch"
LENGTH = "length"
ACT_HEADS = "activation_heads"  # the N (or K) head axis of q/k/v/attention outputs

RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, ("data", "fsdp", "expert")),
    (LENGTH, None),
    (ACT_HEADS, "tensor"),
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (DT_HEADS, None),
    (HEAD_DIM, None),
    (EXPERTS, "expert"),
    (ROUTER_KEYS, None),
)


def logical_to_spec(logical: Sequence[str | None] | None, rules=RULES) -> P:
    """('embed', 'mlp') → P('fsdp', 'tensor'); each mesh axis is used at most once per spec."""
    if logical is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def param_logical_axes(state: nnx.State) -> Any:
    """The logical axes of every Variable in `state` (a pytree of tuples / None, same structure)."""
    return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from `spec` where they do not divide the dimension (e.g. 2 kv heads on 4 devices)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = 1
        kept = []
        for a in names:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings for every Variable of `state` (abstract or concrete), from its logical axes."""

    def one(v):
        spec = logical_to_spec(v.get_metadata().get("logical_axes"), rules)
        return NamedSharding(mesh, fit_spec(spec, v.get_value().shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical: Sequence[str | None], rules=RULES) -> jax.Array:
    """`jax.lax.with_sharding_constraint` of an activation to its logical axes under the mesh set with
    `jax.set_mesh` (the trainer's); the identity when no mesh is set. Axes that do not divide are dropped."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(logical_to_spec(logical, rules), x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=RULES) -> NamedSharding:
    """Batch-major activations/inputs: the batch over every data-like axis, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec((BATCH,) + (None,) * (ndim - 1), rules))
