"""The named choices of `DogeConfig` whose values are implementations: one table each, read by the config
(allowed values) and by the module that uses them (the implementation), so the two can never disagree."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# hidden_act → the function, with transformers' meaning of each name.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # transformers' "gelu" is the exact erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}

# Names the attention puts on its tensors (jax.ad_checkpoint.checkpoint_name), for the policies below.
ATTENTION_OUT = "dma_out"  # the attention output [B, T, N, H] (reference and kernels)
ATTENTION_LSE = "dma_lse"  # the kernels' per-row log-sum-exp: with the output, all their backward pass needs

# remat_policy → what a decoder layer saves for the backward pass ("none": no remat at all; "auto" is resolved
# to "scores" where the XLA reference computes the attention, else to "none": attention_impl.resolved_remat).
REMAT_POLICIES = {
    "auto": None,
    "none": None,
    "full": None,  # save nothing, recompute the layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Save only the attention's output and softmax statistics: the layer's cheap projections are recomputed,
    # the attention (a kernel's forward) is not, so the forward kernel runs once per layer.
    "attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_LSE),
    # No layer remat; the XLA reference attention alone is checkpointed (its inputs kept, its [B, N, T, S] scores,
    # bias and softmax recomputed in the backward pass): one layer's scores live at a time instead of every
    # layer's (the CPU path's memory). A kernel keeps no such tensors: there it is "none".
    "scores": None,
}

# attention_impl (doge_jax.model.attention_impl chooses): the XLA reference, a named Pallas kernel, the kernel
# of the current backend, or "auto" (the kernel where it can run, else the reference, logged).
ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_gpu", "pallas_tpu")

# moe_impl (doge_jax.model.moe chooses): the dense reference, the expert-parallel shard_map, or "auto"
# (expert-parallel when the mesh the model runs under has an `expert` axis > 1).
MOE_IMPLS = ("auto", "reference", "expert_parallel")
