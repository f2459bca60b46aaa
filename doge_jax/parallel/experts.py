"""Expert-parallel CDMoE experts: the expert tables split over the `expert` mesh axis, computed in `shard_map`.

What moves where (n = size of the `expert` axis, E experts, k per token, D model dim, M tokens of one
data/fsdp group, which the trainer's BATCH rule also splits n ways over `expert`):

    tables   down/up_embed [E, D] → each expert shard holds the contiguous block e ∈ [s·E/n, (s+1)·E/n)
    tokens   h [M/n, D], indices/weights [M/n, k] per device → all_gather over `expert` → [M, D], [M, k]
    compute  each shard keeps the (index, weight) pairs that fall in its block (the others get weight 0),
             gathers the rows from its local table and forms its partial Σ_k w_k·act(⟨down[e_k], h⟩)·up[e_k]
    combine  psum_scatter over `expert`: every device gets the full sum for its own M/n tokens

Routing (router_gate, top-k over product keys, softmax) needs no table and is token-local: the module runs
it before this function, its top-k inside a token-sharded shard_map as well (`sharded_select_experts`; XLA
would otherwise all-gather the router scores of the global batch for `lax.top_k`). The tables are never
all-gathered over `expert`, and their gradients stay local (the transpose of a local gather is a local
scatter-add); only the fsdp slice of D is gathered, as FSDP does for every weight.

Why this and not all-to-all token dispatch (per device and layer; L local tokens, n = expert-axis size):
- bytes: all_gather + psum_scatter move (n-1)·L·D values in and out. All-to-all sends a token to each distinct
  shard among its k experts, n·(1-(1-1/n)^k) of them: every shard when k=64 and n ≤ 16 (the same bytes), about
  5.3 of 8 with top-8 (4.3 remote vs 7: 40 % fewer) — but only with exactly-sized buffers.
- static shapes: how many of a group's pairs land on one shard depends on the data. An all-to-all buffer that
  can never overflow holds L·k pairs per destination, n·k times the all-gather volume; a capacity factor makes
  it small but drops pairs, and the results would no longer equal the reference. The masked design is exact
  with static shapes and no sort.
- its price: every shard scans all n·L·k pairs of its group (masked), so the expert term costs each device
  n times its data-parallel share: 4·k·D flops and 2·k·D table reads per token, against the shared MLP's
  6·D·F flops, i.e. n·2k/(3F) of the MLP's flops (8·128/6144 ≈ 17 % at the 320M shape with
  top-64 on 8 expert shards). Rank-1 experts keep that affordable while the tables' memory, the reason to
  shard them, drops n-fold. benchmarks/bench_moe.py measures it; CPU fake devices share the host's cores, so
  they check correctness, not collective cost (no accelerator was at hand when this was written).
The next step, if the scan shows up in profiles: compact each shard's local pairs into cf·L·k slots (a cumsum
of the mask, no sort), exact while no shard overflows, with the dropped fraction as a metric.
"""

from __future__ import annotations

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
                            up_embed: jax.Array, act: Callable, *, mesh: Any = None) -> jax.Array:
    """`moe_reference.experts_reference` with the tables sharded on `expert` (same signature).

    h [M, D]; indices, weights [M, k]; down_embed, up_embed [E, D] → [M, D]. `mesh`: a Mesh / AbstractMesh, or
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
    tokens = P(token_axes or None, None)
    table = P(EXPERT_AXIS, None)
    e_local = E // n

    def body(h, indices, weights, down_local, up_local):
        if exchange:  # [M/n, ·] → [M, ·]: every expert shard sees all tokens of its data/fsdp group
            h, indices, weights = (jax.lax.all_gather(x, EXPERT_AXIS, axis=0, tiled=True)
                                   for x in (h, indices, weights))
        first = jax.lax.axis_index(EXPERT_AXIS) * e_local
        partial = local_experts(h, indices, weights, down_local, up_local, act, first)  # [M, D]
        if exchange:
            return jax.lax.psum_scatter(partial, EXPERT_AXIS, scatter_dimension=0, tiled=True)  # [M/n, D]
        return jax.lax.psum(partial, EXPERT_AXIS)

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
        out_specs=tokens,  # [M, D], sharded like h
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
