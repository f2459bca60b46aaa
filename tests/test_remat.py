"""What a layer keeps for the backward pass (model.remat_policy), and that it never changes the gradients.

- "attention": the layer is recomputed except the attention's output and log-sum-exp (saved by name), so the
  forward DMA kernel runs once per layer (counted in the traced step, and in the step lowered for CUDA and TPU),
  not twice as under "full";
- "scores" (what "auto" means where the XLA reference runs): the reference over query chunks recomputed in the
  backward pass (model/dma_chunked.py); equal to the reference, and the compiled step's memory falls;
- every policy's gradients equal "none"'s: fp32, |Δ| ≤ 1e-5 · max(1, max |g|) per parameter (recomputation in
  another order; measured ≤ 2e-6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from doge_jax.model import attention_impl, decoder as model_lib
from doge_jax.model.config import DogeConfig
from doge_jax.model.dma_chunked import dma_reference_chunked, query_chunk
from doge_jax.model.dma_reference import dma_reference
from doge_jax.model.mask import MaskSpec

LAYERS = 3


def _cfg(**kw):
    return DogeConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                keep_window_size=24), **kw})


def _grads(cfg, seed=0):
    model = model_lib.build(cfg, seed=1)
    for i, layer in enumerate(model.layers):  # A ≠ 0: dt varies over keys (the top-k is active: T > w)
        layer.self_attn.A[...] = jax.random.normal(jax.random.key(10 + i), layer.self_attn.A[...].shape)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(seed), (2, 48), 0, cfg.vocab_size)

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params, rest)(ids).logits ** 2)

    return graphdef, params, rest, ids, jax.grad(loss)(params), loss


def _forward_kernel_calls(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        name = eqn.params.get("name_and_src_info") or eqn.params.get("name", "")  # the key differs across jax
        if eqn.primitive.name == "pallas_call" and "dma_forward" in str(name):
            n += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _forward_kernel_calls(inner)
    return n


@pytest.mark.parametrize("impl,policies", [
    ("xla", ["full", "dots", "attention", "scores", "auto"]),
    ("pallas_gpu", ["full", "attention"]),  # the Triton kernel in interpret mode
])
def test_every_policy_keeps_the_gradients(impl, policies):
    *_, want, _ = _grads(_cfg(attention_impl=impl, remat_policy="none"))
    for policy in policies:
        *_, got, _ = _grads(_cfg(attention_impl=impl, remat_policy=policy))
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            tol = 1e-5 * max(1.0, float(jnp.max(jnp.abs(w))))
            np.testing.assert_allclose(g, w, rtol=0, atol=tol, err_msg=f"{impl} {policy} {path}")


def test_attention_policy_runs_the_forward_kernel_once_per_layer():
    counts = {}
    for policy in ("none", "full", "attention"):
        graphdef, params, rest, ids, _, loss = _grads(_cfg(attention_impl="pallas_gpu", remat_policy=policy))
        counts[policy] = _forward_kernel_calls(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert counts == {"none": LAYERS, "full": 2 * LAYERS, "attention": LAYERS}, counts


@pytest.mark.slow
@pytest.mark.parametrize("platform,impl,prefix", [("cuda", "pallas_gpu", "dma_"), ("tpu", "pallas_tpu", "dma_tpu_")])
def test_attention_policy_in_the_step_lowered_for_gpu_and_tpu(platform, impl, prefix):
    """The trainer's own step, lowered for CUDA / TPU from this host (kernel custom calls, counted per call site)."""
    from configs import doge_20m
    from doge_jax.trainer import lowering
    from doge_jax.trainer.mesh import make_mesh

    counts = {}
    for policy in ("full", "attention"):
        config = doge_20m.get_config()
        m = config.model
        m.num_hidden_layers, m.attention_impl, m.remat_policy, m.dtype = 2, impl, policy, "bfloat16"
        config.seq_len, config.batch_size, config.grad_accum_steps = 256, 2, 1
        config.progress_bar = config.tensorboard = False
        text = lowering.lower_train_step(config, make_mesh(config.mesh, jax.devices()[:1]), platform)
        counts[policy] = lowering.kernel_report(text, platform).counts()
    backward = {f"{prefix}backward_dq": 2, f"{prefix}backward_dkv": 2}
    assert counts["full"] == {f"{prefix}forward": 4, **backward}, counts
    assert counts["attention"] == {f"{prefix}forward": 2, **backward}, counts


@pytest.mark.parametrize("masks", ["causal", "segments_padding"])
def test_chunked_reference_equals_the_reference(masks):
    B, T, N, K, H = 2, 100, 4, 2, 16
    ks = jax.random.split(jax.random.key(3), 5)
    q, do = (jax.random.normal(kk, (B, T, N, H)) for kk in ks[:2])
    k, v = (jax.random.normal(kk, (B, T, K, H)) for kk in ks[2:4])
    dt = jnp.exp(jax.random.normal(ks[4], (B, K, T)))
    mask = MaskSpec(keep_window_size=30)
    if masks == "segments_padding":
        seg = jnp.where(jnp.arange(T) < 40, 1, 2)[None].repeat(B, 0)
        mask = MaskSpec(keep_window_size=30, q_segment_ids=seg, kv_segment_ids=seg,
                        kv_mask=jnp.arange(T)[None] >= jnp.array([[0], [7]]))

    def vjp(fn):
        out, pull = jax.vjp(lambda *a: fn(*a, mask, scale=H**-0.5), q, k, v, dt)
        return [out, *pull(do)]

    want = vjp(dma_reference)
    got = vjp(lambda *a, **kw: dma_reference_chunked(*a, **kw, chunk=16))  # 7 chunks, the last one padded
    for name, g, w in zip(["out", "dq", "dk", "dv", "ddt"], got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(w)))), err_msg=name)
    assert query_chunk(8, 2, 2048, 2048) == 512 and query_chunk(1, 2, 100, 100) == 100


def test_scores_policy_cuts_the_compiled_steps_memory():
    """The XLA path's compiled train step holds far less with "scores" ("auto" on CPU) than with "none"."""
    peaks = {}
    for policy in ("none", "scores"):
        cfg = _cfg(remat_policy=policy, max_position_embeddings=2048, keep_window_size=2048)
        graphdef, params, rest = nnx.split(model_lib.build(cfg), nnx.Param, ...)
        ids = jnp.zeros((2, 2048), jnp.int32)  # 2 query chunks of 1024
        step = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids, head=False).hidden ** 2)))
        m = step.lower(params).compile().memory_analysis()
        peaks[policy] = m.temp_size_in_bytes
    # [2, 4, 2048, 2048] float32 scores are 134 MB a tensor, several per layer for 3 layers without recompute.
    assert peaks["scores"] < 0.5 * peaks["none"], peaks
    assert attention_impl.resolved_remat("auto", "auto", backend="cpu") == "scores"
    assert attention_impl.resolved_remat("auto", "auto", backend="gpu") == "none"
    assert attention_impl.resolved_remat("auto", "xla", backend="tpu") == "scores"
    assert attention_impl.resolved_remat("full", "auto", backend="cpu") == "full"
