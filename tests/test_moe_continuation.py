"""Dense → MoE continuation end to end: a random transformers dense Doge → convert.from_hf → continuation (CLI)
→ MoE checkpoint → training-style loss/grad → convert.to_hf → transformers `DogeForCausalLM` with is_moe=True.

Tolerances (fp32): exact equality where the expert term is zero (the same XLA ops run on the same numbers);
2e-5 absolute on logits against transformers (as tests/test_parity.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

import convert
import doge_jax
from doge_jax import checkpoint as ckpt
from doge_jax import continuation
from doge_jax.cli import continuation as continuation_cli
from doge_jax.model import moe_reference as moe
from hf_reference import make_hf_model, torch_logits

LOGIT_ATOL = 2e-5
NUM_EXPERTS, TOP_K = 64, 4


def _distinct_ids(batch, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(vocab)[:length] for _ in range(batch)]).astype(np.int32)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A random (perturbed) transformers dense Doge converted to a doge-jax checkpoint, with a tokenizer folder."""
    root = tmp_path_factory.mktemp("dense")
    hf_model = make_hf_model(seed=11)
    hf_model.save_pretrained(root / "hf")
    path = convert.from_hf(str(root / "hf"), str(root / "ckpt"))
    (root / "ckpt" / "tokenizer").mkdir()
    (root / "ckpt" / "tokenizer" / "tokenizer_config.json").write_text("{}")
    return path, hf_model


@pytest.fixture(scope="module")
def moe_ckpt(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "ckpt"
    rc = continuation_cli.main(["--dense", dense[0], "--out", str(out), "--num-experts", str(NUM_EXPERTS),
                            "--top-k", str(TOP_K), "--seed", "3"])
    assert rc == 0
    return str(out)


def test_continuation_copies_dense_and_inits_experts(dense, moe_ckpt):
    dense_model = doge_jax.load_model(dense[0])
    model = doge_jax.load_model(moe_ckpt)
    cfg = model.cfg
    assert cfg.is_moe and cfg.num_experts == NUM_EXPERTS and cfg.num_experts_per_tok == TOP_K
    assert cfg.router_layout == "per_token"
    assert cfg.replace(is_moe=False, num_experts=dense_model.cfg.num_experts, router_layout="transformers",
                       num_experts_per_tok=dense_model.cfg.num_experts_per_tok) == dense_model.cfg
    ref = ckpt.resolve(moe_ckpt)
    assert ref.step == 0 and ref.tokenizer_dir is not None
    for i in range(cfg.num_hidden_layers):
        dense_mlp, mlp = dense_model.layers[i].mlp, model.layers[i].mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            np.testing.assert_array_equal(getattr(mlp, name).kernel[...], getattr(dense_mlp, name).kernel[...])
        for table in (mlp.down_embed[...], mlp.up_embed[...], mlp.router_gate.kernel[...]):
            assert abs(float(jnp.std(table)) / cfg.initializer_range - 1) < 0.1  # normal(0, initializer_range)
    # Different layers get different tables.
    assert not np.allclose(model.layers[0].mlp.up_embed[...], model.layers[1].mlp.up_embed[...])


def test_moe_at_init_is_dense_plus_expert_term(dense, moe_ckpt):
    """MoE logits == dense logits exactly once the expert term is removed (up_embed = 0); with the fresh
    tables the difference is the expert term alone, small next to the logits."""
    dense_model = doge_jax.load_model(dense[0])
    model = doge_jax.load_model(moe_ckpt)
    ids = jnp.asarray(_distinct_ids(2, 24, model.cfg.vocab_size, seed=1))
    dense_logits = np.asarray(dense_model(ids).logits)
    moe_logits = np.asarray(model(ids).logits)

    # Layer level: the CDMoE is the dense MLP plus the reference expert term on the same input.
    x = jax.random.normal(jax.random.key(0), (2, 5, model.cfg.hidden_size))
    mlp, dense_mlp = model.layers[0].mlp, dense_model.layers[0].mlp
    block = mlp(x)
    out, scores = block.out, block.routing.scores
    expert_scores, idx = moe.select_experts(scores, model.cfg.num_keys, TOP_K)
    term = moe.experts_reference(x.reshape(10, -1), idx, moe.routing_weights(expert_scores, False),
                                 mlp.down_embed[...], mlp.up_embed[...], mlp.act).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense_mlp(x).out + term), atol=1e-6, rtol=0)

    for layer in model.layers:
        layer.mlp.up_embed[...] = jnp.zeros_like(layer.mlp.up_embed[...])
    np.testing.assert_array_equal(np.asarray(model(ids).logits), dense_logits)
    diff = np.abs(moe_logits - dense_logits).max()
    rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a))))  # noqa: E731
    print(f"\nstep-0 MoE vs dense (random dense model, σ={model.cfg.initializer_range}): max |Δlogit| = "
          f"{diff:.2e}, max |logit| {np.abs(dense_logits).max():.2f}; layer 0 on x ~ N(0, 1): "
          f"rms(expert term) / rms(x) = {rms(term) / rms(x):.1e}, rms(dense MLP) / rms(x) = "
          f"{rms(dense_mlp(x).out) / rms(x):.1e}")
    assert 0 < diff and np.isfinite(moe_logits).all()


def test_zero_up_embed_computes_the_dense_function(dense, tmp_path):
    out = continuation.continue_from_dense(dense[0], str(tmp_path / "moe"), num_experts=16, top_k=2,
                                           zero_up_embed=True)
    ids = jnp.asarray(_distinct_ids(2, 16, 97, seed=2))
    np.testing.assert_array_equal(np.asarray(doge_jax.load_model(out)(ids).logits),
                                  np.asarray(doge_jax.load_model(dense[0])(ids).logits))


def test_continuation_rejects_bad_inputs(dense, moe_ckpt, tmp_path):
    with pytest.raises(ValueError, match="num_experts=60 must be a perfect square"):
        continuation.continue_from_dense(dense[0], str(tmp_path / "a"), num_experts=60, top_k=4)
    with pytest.raises(ValueError, match="is_moe=True already"):
        continuation.continue_from_dense(moe_ckpt, str(tmp_path / "b"), num_experts=64, top_k=4)
    with pytest.raises(FileExistsError, match="already exists"):
        continuation.continue_from_dense(dense[0], moe_ckpt, num_experts=64, top_k=4)
    assert continuation_cli.main(["--dense", dense[0], "--out", str(tmp_path / "c"), "--num-experts", "60",
                              "--top-k", "4"]) == 2
    assert not (tmp_path / "c").exists()


def test_export_loads_in_transformers(moe_ckpt, tmp_path):
    """to_hf → transformers (is_moe=True): equal to our model run with transformers' router layout; and the
    measured gap between transformers' full forward and our per-token routing (the README's numbers)."""
    from transformers import AutoModelForCausalLM

    hf_dir = convert.to_hf(moe_ckpt, str(tmp_path / "hf"))
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert hf_model.config.is_moe and hf_model.config.num_experts == NUM_EXPERTS
    ids = _distinct_ids(3, 24, hf_model.config.vocab_size, seed=4)
    ref = torch_logits(hf_model, ids)

    as_hf = doge_jax.load_model(moe_ckpt, router_layout="transformers")
    out_hf = as_hf(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out_hf.logits), ref, atol=LOGIT_ATOL, rtol=0)

    per_token = np.asarray(doge_jax.load_model(moe_ckpt)(jnp.asarray(ids)).logits)
    gap = np.abs(per_token - ref).max()
    # Same router logits, routed both ways: which tokens get a different set of top-k experts.
    B, T = ids.shape
    nk = as_hf.cfg.num_keys
    differ = []
    for scores in (r.scores for r in out_hf.routing):  # [2, B·T, nk]: transformers' view of logits [B, T, 2·nk]
        logits = scores.reshape(B, T, 2 * nk)
        _, idx_hf = moe.select_experts(moe.router_scores(logits, "transformers"), nk, TOP_K)
        _, idx_tok = moe.select_experts(moe.router_scores(logits, "per_token"), nk, TOP_K)
        differ.append(np.mean(np.any(np.sort(idx_hf, -1) != np.sort(idx_tok, -1), axis=-1)))
    print(f"\nper_token model in transformers' full forward: max |Δlogit| = {gap:.2e} "
          f"(max |logit| {np.abs(ref).max():.2f}, rms {np.sqrt(np.mean(ref ** 2)):.2f}); "
          f"tokens with a different top-{TOP_K} set per layer: "
          f"{[round(float(d), 3) for d in differ]}")
    assert gap > LOGIT_ATOL and min(differ) > 0.5  # the layouts really route differently

    # Token-by-token decoding with batch 1 routes per token in transformers too: the last position agrees.
    one = ids[:1, :8]
    step_logits = []
    with torch.no_grad():
        cache = None
        for t in range(one.shape[1]):
            o = hf_model(torch.from_numpy(one[:, t:t + 1].astype(np.int64)), cache=cache, use_cache=True)
            cache = o.cache
            step_logits.append(o.logits[:, -1].float().numpy())
    ours = np.asarray(doge_jax.load_model(moe_ckpt)(jnp.asarray(one)).logits)
    np.testing.assert_allclose(np.stack(step_logits, 1), ours, atol=LOGIT_ATOL, rtol=0)
