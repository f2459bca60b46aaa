"""Expert-parallel CDMoE experts: the expert tables split over the `expert` mesh axis, computed in `shard_map`.

What moves where (n = size of the `expert` axis, E experts, k per token, D model dim, M tokens of one
data/fsdp group, which the trainer's BATCH rule also splits n ways over `expert`, C capacity slots):

    tables   down/up_embed [E, D] → each expert shard holds the contiguous block e ∈ [s·E/n, (s+1)·E/n)
    tokens   h [M/n, D], indices/weights [M/n, k] per device → all_gather over `expert` → [M, D], [M, k]
    compute  capacity_factor = 0 (exact): each shard scans all M·k pairs and masks the foreign ones (weight 0).
             capacity_factor = cf > 0: each shard compacts the pairs it owns into C = ceil(cf·M·k/n) slots
             (a cumsum of the ownership mask gives each owned pair its slot, in (token, rank) order: no sort),
             drops those past C, and computes only the C slots: gather h and the two table rows per slot,
             scatter-add w·act(⟨down, h⟩)·up back to its token. Per-shard expert work is cf/n of the group's.
    combine  psum_scatter over `expert`: every device gets the full sum for its own M/n tokens

Routing (router_gate, top-k over product keys, softmax) needs no table and is token-local: the module runs
it before this function, its top-k inside a token-sharded shard_map as well (`sharded_select_experts`; XLA
would otherwise all-gather the router scores of the global batch for `lax.top_k`). The tables are never
all-gathered over `expert`, and their gradients stay local (the transpose of a local gather is a local
scatter-add); only the fsdp slice of D is gathered, as FSDP does for every weight.

Why all_gather + psum_scatter and not all-to-all dispatch (per device and layer; L = M/n local tokens):
- bytes: all_gather + psum_scatter move (n-1)·L·D values in and out, whatever the routing. A static
  (capacity-bounded) all-to-all sends one D-vector per (token, expert) pair: cf·k·L·D out and back. It moves
  fewer bytes only when cf·k < n-1, i.e. top-k below the expert-axis size (never for the presets: top-8 at
  n ≤ 8, top-64). Sending each token once per *distinct* destination shard (n·(1-(1-1/n)^k) of them) needs
  data-dependent sizes: `jax.lax.ragged_all_to_all`, which has no CPU implementation (jax's own test skips
  it there), so it could not be tested here against the reference; it is left for a profile that needs it.
- the same code runs on every backend (CPU fake devices in the tests, GPU, TPU).
- drops: only the slots are bounded, and only with cf > 0. With cf = 0 the masked scan is exact, at n times
  its data-parallel share of expert work per device (4·k·D flops per token); with cf > 0 it is cf times the
  share, and results equal the reference as long as no shard overflows (`dropped` counts the pairs that did:
  `moe/dropped_fraction` in the training metrics).
benchmarks/bench_moe.py counts the per-shard FLOPs of both from the compiled HLO.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from doge_jax.model import moe_reference as moe
from doge_jax.parallel import sharding as sh

EXPERT_AXIS = "expert"


def local_experts(h: jax.Array, indices: jax.Array, weights: jax.Array, down_local: jax.Array,
                  up_local: jax.Array, act: Callable, first_expert: jax.Array | int) -> jax.Array:
    """One shard's share of the routed sum: only the experts [first_expert, first_expert + E_local).

    h [M, D]; indices, weights [M, k] (global expert ids); down_local, up_local [E_local, D] → [M, D].
    Summing this over a partition of the experts gives `moe.experts_reference` exactly (up to fp addition order).
    """
    e_local = down_local.shape[0]
    local = indices - first_expert  # [M, k] position in the local block
    mine = (local >= 0) & (local < e_local)
    # Foreign pairs read row 0 with weight 0: act(·)·0 = 0 forward, and zero gradient to that row and to h.
    return moe.experts_reference(h, jnp.where(mine, local, 0), jnp.where(mine, weights, 0.0), down_local,
                                 up_local, act)


def compact_pairs(indices: jax.Array, first_expert: jax.Array | int, e_local: int, slots: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The pairs of experts [first_expert, first_expert + e_local) in C = `slots` slots, in (token, rank) order.

    indices [M, k] (global expert ids) → (pair [C] (flat index m·k + r of the slot's pair), token [C],
    local expert [C], valid [C] bool, dropped [] int32: owned pairs past the last slot). Empty slots point at
    pair 0 with valid = False."""
    M, k = indices.shape
    local = (indices - first_expert).reshape(M * k)  # [M·k]
    mine = (local >= 0) & (local < e_local)
    slot = jnp.cumsum(mine.astype(jnp.int32)) - 1  # [M·k]: the owned pairs numbered 0, 1, 2, ...
    keep = mine & (slot < slots)
    pair = jnp.zeros((slots,), jnp.int32).at[jnp.where(keep, slot, slots)].set(
        jnp.arange(M * k, dtype=jnp.int32), mode="drop")  # [C]; out-of-range destinations are dropped
    owned = jnp.sum(mine.astype(jnp.int32))
    valid = jnp.arange(slots) < owned
    return pair, pair // k, jnp.where(valid, local[pair], 0), valid, owned - jnp.minimum(owned, slots)


def slot_experts(h: jax.Array, pair: jax.Array, token: jax.Array, expert: jax.Array, valid: jax.Array,
                 weights: jax.Array, down_local: jax.Array, up_local: jax.Array, act: Callable) -> jax.Array:
    """The routed sum over compacted slots. h [M, D]; pair, token, expert, valid [C] (`compact_pairs`);
    weights [M, k]; down_local, up_local [E_local, D] → [M, D], Σ over valid slots of w·act(⟨down, h⟩)·up."""
    # Every index is in range by construction; mode="clip" says so to XLA, which otherwise masks each gathered
    # element and each scattered update (about 40 % more counted FLOPs, forward and backward).
    w = jnp.where(valid, weights.reshape(-1).at[pair].get(mode="clip"), 0.0).astype(h.dtype)  # [C]; 0: inert
    down = down_local.at[expert].get(mode="clip").astype(h.dtype)  # [C, D]
    up = up_local.at[expert].get(mode="clip").astype(h.dtype)  # [C, D]
    x = h.at[token].get(mode="clip")  # [C, D]
    a = act(jnp.einsum("CD,CD->C", down, x)) * w  # [C]
    return jnp.zeros_like(h).at[token].add(a[:, None] * up, mode="clip")  # [M, D]


def capacity(num_pairs: int, n: int, capacity_factor: float) -> int | None:
    """Slots per shard for `num_pairs` (token, expert) pairs of a group over n expert shards: ceil(cf·pairs/n)
    rounded up to a multiple of 8; None (the exact masked path) when cf = 0 or the slots would hold them all."""
    if capacity_factor <= 0:
        return None
    slots = -(-math.ceil(capacity_factor * num_pairs / n) // 8) * 8
    return None if slots >= num_pairs else slots


def expert_axis_size(mesh: Any) -> int:
    """Size of the mesh's `expert` axis (1 when there is no mesh or no such axis)."""
    if mesh is None or getattr(mesh, "empty", False):
        return 1
    return int(dict(mesh.shape).get(EXPERT_AXIS, 1))


def _token_axes(mesh: Any, num_tokens: int) -> tuple[str, ...]:
    """The mesh axes the tokens are split over: the BATCH rule, less the axes that do not divide num_tokens."""
    spec = sh.fit_spec(sh.logical_to_spec((sh.BATCH, None)), (num_tokens, 1), mesh)
    axes = spec[0]
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def expert_parallel_experts(h: jax.Array, indices: jax.Array, weights: jax.Array, down_embed: jax.Array,
                            up_embed: jax.Array, act: Callable, *, mesh: Any = None, capacity_factor: float = 0.0
                            ) -> tuple[jax.Array, jax.Array]:
    """`moe_reference.experts_reference` with the tables sharded on `expert`, and the count of dropped pairs.

    h [M, D]; indices, weights [M, k]; down_embed, up_embed [E, D] → (out [M, D], dropped [] int32: pairs over
    capacity, summed over the whole batch; 0 when capacity_factor = 0). `mesh`: a Mesh / AbstractMesh, or
    None for the one set with `jax.set_mesh`. Works for any expert-axis size, 1 included.
    """
    ctx = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    n = expert_axis_size(ctx)
    E, D = down_embed.shape
    if E % n:
        raise ValueError(f"num_experts={E} must be a multiple of the '{EXPERT_AXIS}' mesh axis size {n}")
    M, k = indices.shape
    token_axes = _token_axes(ctx, M)
    exchange = EXPERT_AXIS in token_axes  # tokens split over `expert` too: gather them, scatter the sums back
    group_axes = tuple(a for a in token_axes if a != EXPERT_AXIS)  # the data/fsdp groups of tokens
    tokens = P(token_axes or None, None)
    table = P(EXPERT_AXIS, None)
    e_local = E // n

    def body(h, indices, weights, down_local, up_local):
        if exchange:  # [M/n, ·] → [M, ·]: every expert shard sees all tokens of its data/fsdp group
            h, indices, weights = (jax.lax.all_gather(x, EXPERT_AXIS, axis=0, tiled=True)
                                   for x in (h, indices, weights))
        first = jax.lax.axis_index(EXPERT_AXIS) * e_local
        slots = capacity(indices.size, n, capacity_factor)  # static: the group's pairs are a static shape
        if slots is None:
            partial = local_experts(h, indices, weights, down_local, up_local, act, first)  # [M, D]
            dropped = jnp.zeros((), jnp.int32)
        else:
            pair, token, expert, valid, dropped = compact_pairs(indices, first, e_local, slots)  # [C] each
            partial = slot_experts(h, pair, token, expert, valid, weights, down_local, up_local, act)  # [M, D]
            dropped = jax.lax.psum(dropped, (*group_axes, EXPERT_AXIS))  # each shard's own pairs, whole batch
        if exchange:
            return jax.lax.psum_scatter(partial, EXPERT_AXIS, scatter_dimension=0, tiled=True), dropped  # [M/n, D]
        return jax.lax.psum(partial, EXPERT_AXIS), dropped

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(
            tokens,  # h [M, D]: tokens over the batch axes, D whole
            tokens,  # indices [M, k]
            tokens,  # weights [M, k]
            table,  # down_embed [E, D]: expert blocks over `expert`, D whole (gathered over fsdp)
            table,  # up_embed [E, D]
        ),
        out_specs=(tokens, P()),  # out [M, D] sharded like h; dropped [] (summed over every axis it varies on)
        check_vma=True,
    )
    return fn(h, indices, weights, down_embed, up_embed)


def sharded_select_experts(scores: jax.Array, num_keys: int, top_k: int, *, mesh: Any = None
                           ) -> tuple[jax.Array, jax.Array]:
    """`moe.select_experts` run by each token shard on its own tokens.

    scores [2, M, nk] → (expert scores [M, k], expert indices [M, k]). Routing is token-local, but XLA's SPMD
    partitioner all-gathers the operand of a batch-sharded `lax.top_k` (seen on CPU with jax 0.10), which would
    make every device route every token of the global batch. `mesh`: as in `expert_parallel_experts`."""
    ctx = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    token_axes = _token_axes(ctx, scores.shape[1])
    if not token_axes:
        return moe.select_experts(scores, num_keys, top_k)
    tokens = P(token_axes, None)
    fn = jax.shard_map(
        lambda s: moe.select_experts(s, num_keys, top_k),
        mesh=mesh,
        in_specs=(P(None, token_axes, None),),  # scores [2, M, nk]: tokens over the batch axes
        out_specs=(tokens, tokens),  # [M, k] each
        check_vma=True,
    )
    return fn(scores)
