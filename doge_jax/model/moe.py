"""The CDMoE block: the shared gated MLP plus `num_experts` rank-1 experts chosen by product keys.

Expert e = (x, y) ∈ [num_keys]² (e = x·num_keys + y) scores s_x[x] + s_y[y]; a token keeps the top
`num_experts_per_tok` experts, weights them with a softmax over their scores, and adds
Σ_e w_e · act(⟨down_embed[e], h⟩) · up_embed[e] to the shared MLP's output. The arithmetic is in
`moe_reference`; this module owns the parameters and chooses, in `experts_impl`, how the experts run.

`cfg.moe_impl` (the one selection point):
- "reference": `moe_reference.experts_reference`, on whatever the parameters' sharding gives.
- "expert_parallel": `doge_jax.parallel.experts` (tables sharded over the `expert` mesh axis, in shard_map) on
  the mesh the model runs under (`jax.set_mesh`, as the trainer does); an error without one.
- "auto": expert-parallel when that mesh has an `expert` axis > 1, else the reference.
`cfg.capacity_factor` > 0 bounds each expert shard's work on the expert-parallel path (pairs past capacity are
dropped and counted in `Routing.dropped`); the reference never drops.
Routing (the top-k over product keys) runs per token shard whenever a mesh is set (see `parallel.experts`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from doge_jax.model import moe_reference as ref
from doge_jax.model.layers import MLP, BlockOutput, Dense
from doge_jax.parallel import experts as ep
from doge_jax.parallel import sharding as sh


def experts_impl(moe_impl: str, mesh) -> str:
    """"reference" or "expert_parallel" for `cfg.moe_impl` under `mesh` (an abstract mesh; empty = none)."""
    n = ep.expert_axis_size(mesh)
    if moe_impl == "expert_parallel":
        if mesh is None or mesh.empty:
            raise ValueError("moe_impl='expert_parallel' needs a device mesh: run the model under "
                             "jax.set_mesh(mesh) (the trainer does), or use moe_impl='auto'")
        return "expert_parallel"
    if moe_impl == "auto" and n > 1:
        return "expert_parallel"
    return "reference"


class CDMoE(MLP):
    """The shared MLP (inherited, so its parameters are named as in a dense layer) plus the routed experts."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        D, E, nk = cfg.hidden_size, cfg.num_experts, cfg.num_keys
        self.router_gate = Dense(D, 2 * nk, use_bias=False, logical_axes=(sh.EMBED, sh.ROUTER_KEYS),
                                 init_std=cfg.initializer_range, dtype=dtype, rngs=rngs)
        std = cfg.initializer_range
        self.down_embed = nnx.Param(std * jax.random.normal(rngs.params(), (E, D)), logical_axes=(sh.EXPERTS, sh.EMBED))
        self.up_embed = nnx.Param(std * jax.random.normal(rngs.params(), (E, D)), logical_axes=(sh.EXPERTS, sh.EMBED))
        self.dtype = dtype

    def __call__(self, h: jax.Array) -> BlockOutput:
        """h [B, T, D] → BlockOutput(out [B, T, D], routing: scores [2, B·T, nk] and experts [B·T, k])."""
        cfg = self.cfg
        B, T, D = h.shape
        mesh = jax.sharding.get_abstract_mesh()
        impl = experts_impl(cfg.moe_impl, mesh)
        scores = ref.router_scores(self.router_gate(h).astype(jnp.float32), cfg.router_layout)  # [2, B·T, nk]
        if mesh.empty or cfg.moe_impl == "reference":
            expert_scores, indices = ref.select_experts(scores, cfg.num_keys, cfg.num_experts_per_tok)
        else:
            expert_scores, indices = ep.sharded_select_experts(scores, cfg.num_keys, cfg.num_experts_per_tok)
        weights = ref.routing_weights(expert_scores, cfg.norm_topk_prob)  # [B·T, k]
        tables = (self.down_embed[...], self.up_embed[...])
        if impl == "expert_parallel":
            routed, dropped = ep.expert_parallel_experts(h.reshape(B * T, D), indices, weights, *tables, self.act,
                                                         capacity_factor=cfg.capacity_factor)
        else:
            routed, dropped = ref.experts_reference(h.reshape(B * T, D), indices, weights, *tables, self.act), None
        out = super().__call__(h).out + routed.reshape(B, T, D)
        return BlockOutput(out=out, routing=ref.Routing(scores=scores, indices=indices, dropped=dropped))
