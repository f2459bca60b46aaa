"""doge-jax vs transformers' DogeForCausalLM through the production converter (convert.from_hf → load_model).

Tolerances (fp32): logits max abs error ≤ 2e-5 (observed ~3e-7), loss ≤ 1e-5, gradients ≤ 1e-4 relative to
the largest gradient entry. Inputs for top-k cases use distinct token ids: repeated tokens give equal `dt`
(v carries no position), and torch.topk breaks such ties in an implementation-defined order (see dma.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

import convert
import doge_jax
from doge_jax.model import loss as loss_lib
from hf_reference import make_hf_model, random_ids, torch_logits

LOGIT_ATOL = 2e-5


def _convert(hf_model, tmp_path):
    src = tmp_path / "hf"
    hf_model.save_pretrained(src)
    return doge_jax.load_model(convert.from_hf(str(src), str(tmp_path / "ckpt")))


def _distinct_ids(batch, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(vocab)[:length] for _ in range(batch)]).astype(np.int32)


CASES = {
    "gqa": (dict(), 24),
    "mha": (dict(num_key_value_heads=4), 24),
    "mqa_head_dim": (dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32), 24),
    "tied": (dict(tie_word_embeddings=True), 24),
    "bias_gelu": (dict(attention_bias=True, mlp_bias=True, hidden_act="gelu_pytorch_tanh"), 24),
    "moe": (dict(is_moe=True, num_experts=64, num_experts_per_tok=4), 24),
    "moe_normtopk": (dict(is_moe=True, num_experts=49, num_experts_per_tok=6, norm_topk_prob=True,
                          tie_word_embeddings=True), 24),
    "dynamic_rope_past_original": (dict(max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", factor=4.0, rope_theta=10000.0)), 40),
    "linear_rope": (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0)), 24),
    "topk_window": (dict(keep_window_size=8), 40),
    "sliding_window": (dict(sliding_window=6), 24),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, tmp_path):
    overrides, length = CASES[name]
    hf_model = make_hf_model(seed=len(name), **overrides)
    model = _convert(hf_model, tmp_path)
    ids = _distinct_ids(3, length, hf_model.config.vocab_size, seed=len(name))
    ref = torch_logits(hf_model, ids)
    out = np.asarray(model(jnp.asarray(ids)).logits)
    err = np.abs(out - ref).max()
    print(f"{name}: max abs {err:.2e}, rel {err / np.abs(ref).max():.2e}")
    assert err <= LOGIT_ATOL, f"{name}: max abs logit error {err}"


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("window", [64, 8])
def test_padded_batches_match(side, window, tmp_path):
    hf_model = make_hf_model(seed=3, keep_window_size=window)
    model = _convert(hf_model, tmp_path)
    ids = _distinct_ids(3, 20, hf_model.config.vocab_size, seed=4)
    mask = np.ones_like(ids)
    for row, n_pad in ((0, 5), (1, 2)):
        if side == "left":
            mask[row, :n_pad] = 0
        else:
            mask[row, -n_pad:] = 0
    ref = torch_logits(hf_model, ids, mask)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= LOGIT_ATOL
    # Padding query rows see no key; both sides then average all values uniformly.
    assert np.abs(out - ref).max() <= 1e-4


def test_tied_dt_keeps_every_tied_key(tmp_path):
    """At initialisation A = 0, so dt = 1 for every key: all keys tie at the top-k threshold. doge-jax keeps every
    tied key (torch.topk would keep an arbitrary keep_window_size of them), so the windowed model equals the
    same model with no window."""
    hf_model = make_hf_model(seed=5, perturb=False, keep_window_size=8)
    model = _convert(hf_model, tmp_path)
    dense = doge_jax.load_model(str(tmp_path / "ckpt"), keep_window_size=64)
    ids = jnp.asarray(random_ids(2, 30, hf_model.config.vocab_size, seed=6))
    np.testing.assert_array_equal(np.asarray(model(ids).logits), np.asarray(dense(ids).logits))


@pytest.mark.parametrize("overrides", [dict(), dict(is_moe=True, num_experts=64, num_experts_per_tok=4,
                                                    tie_word_embeddings=True)],
                         ids=["dense", "moe_tied"])
def test_loss_and_gradients_match(overrides, tmp_path):
    hf_model = make_hf_model(seed=7, output_router_logits=True, router_aux_loss_coef=0.05, **overrides)
    model = _convert(hf_model, tmp_path)
    ids = _distinct_ids(2, 16, hf_model.config.vocab_size, seed=8)
    labels = ids.copy()
    labels[0, :4] = -100
    mask = np.ones_like(ids)

    hf_model.zero_grad()
    out = hf_model(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                   labels=torch.from_numpy(labels.astype(np.int64)))
    out.loss.backward()
    ref_grads = {k: v.grad.numpy() for k, v in hf_model.named_parameters() if v.grad is not None}

    cfg = model.cfg
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        m = nnx.merge(graphdef, params, rest)
        o = m(jnp.asarray(ids), jnp.asarray(mask))
        value = loss_lib.causal_lm_loss(o.logits, jnp.asarray(labels))
        if cfg.is_moe:
            value = value + cfg.router_aux_loss_coef * o.aux_loss
        return value

    value, grads = jax.value_and_grad(loss_fn)(params)
    assert abs(float(value) - out.loss.item()) <= 1e-5
    from convert import hf as hf_lib

    ours = hf_lib.params_to_hf(nnx.to_pure_dict(grads))
    assert set(ours) <= set(ref_grads) | {"lm_head.weight"}
    for key, g in ours.items():
        ref = ref_grads[key]
        scale = max(np.abs(ref).max(), 1e-6)
        assert np.abs(g - ref).max() <= 1e-4 * scale + 1e-7, key


def test_moe_aux_loss_matches_transformers():
    from transformers.models.doge.modeling_doge import load_balancing_loss_func

    from doge_jax.model import moe_reference as moe

    rng = np.random.default_rng(0)
    layers = [rng.normal(size=(2, 30, 8)).astype(np.float32) for _ in range(3)]
    mask = (rng.random((5, 6)) > 0.3).astype(np.int64)
    for m in (None, mask):
        ref = load_balancing_loss_func(tuple(torch.from_numpy(x) for x in layers), 64, 8, 5,
                                       None if m is None else torch.from_numpy(m))
        routings = [moe.routing_from_scores(jnp.asarray(x), 8, 5) for x in layers]
        ours = moe.routing_summary(routings, 64, None if m is None else jnp.asarray(m.reshape(-1))).aux_loss
        assert abs(float(ours) - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
