"""The first published SmallDoge layout end to end: Hub folder → doge-jax → transformers 5 folder → HTTP server.

Doge-60M/160M/320M(-Instruct) have no q/k norm and one dynamic-mask bias per attention head. The synthetic
checkpoints here are laid out as SmallDoge published them (nothing is downloaded), in both generations:
- "original": small-doge `src/small_doge/models/configuration_doge.py` / `modeling_doge.py` as of April 2025
  (`hidden_bias`, `dynamic_mask_ratio`, `rope_scaling` with `"type"`, `model.word_embed`, `pre_layernorm`,
  `pre_residual.weight`, `feed_forward.*`, `final_layernorm`, tied embeddings);
- "renamed": the names SmallDoge's `convert_doge_weights_to_hf.py` gave the Hub repos in August 2025
  (transformers' names: `embed_tokens`, `input_residual`, `mlp.*`, ...; `attention_bias` / `mlp_bias` beside the
  old keys, `rope_scaling` with `"rope_type"`, untied head).
Both carry their original `auto_map`, naming a `modeling_doge.py` that is not there: nothing may need it.

The reference is `published_forward`, a float64 numpy transcription of SmallDoge's original forward pass that
reads the original weight names itself, so it is independent of doge-jax, of transformers and of the converter's
renaming. It is exact for sequences within `keep_window_size`, where that code adds the bias and masks nothing;
past it, it applies transformers' Doge top-k window, which the export follows (see modeling_doge_legacy.py).
Tolerance 2e-5 on fp32 logits, as in test_parity.py; inputs use distinct token ids (no ties in the top-k).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jax.numpy as jnp

import convert
import doge_jax
from serve_fixtures import REPO, ServerProcess, _free_port

LOGIT_ATOL = 2e-5
D, F, L, N, K = 64, 96, 2, 4, 2  # hidden, ff, layers, heads, kv heads: GQA, as every published model
H = D // N
# What an export sets itself (its code, its dtype, its writer); every other published key must come back.
EXPORT_OWNED = {"auto_map", "architectures", "transformers_version", "torch_dtype"}
ORIGINAL_AUTO_MAP = {"AutoConfig": "configuration_doge.DogeConfig", "AutoModel": "modeling_doge.DogeModel",
                     "AutoModelForCausalLM": "modeling_doge.DogeForCausalLM"}


# --- published folders -------------------------------------------------------------------------------------------

def published_config(generation: str, vocab: int, tok, drop: tuple[str, ...] = (), **overrides) -> dict:
    common = {
        "architectures": ["DogeForCausalLM"], "auto_map": ORIGINAL_AUTO_MAP, "model_type": "doge",
        "vocab_size": vocab, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
        "num_attention_heads": N, "num_key_value_heads": K, "hidden_act": "silu", "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "keep_window_size": 2048,
        "dynamic_mask_ratio": 0.0, "hidden_bias": False, "is_moe": False, "num_experts": 16384,
        "num_experts_per_tok": 64, "norm_topk_prob": False, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, "torch_dtype": "float32",
    }
    if generation == "original":
        common.update(tie_word_embeddings=True, transformers_version="4.49.0",
                      rope_scaling={"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048})
    else:
        common.update(tie_word_embeddings=False, transformers_version="4.54.1", attention_bias=False,
                      mlp_bias=False, sliding_window=None,
                      rope_scaling={"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048})
    common.update(overrides)
    return {k: v for k, v in common.items() if k not in drop}


def original_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Random fp32 weights under the original names; norms, residual scales and A perturbed so each matters."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.1):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def ones(n):
        return (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)

    V = cfg["vocab_size"]
    out = {"model.word_embed.weight": w(V, D), "model.final_layernorm.weight": ones(D)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = w(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        out.update({
            p + "pre_layernorm.weight": ones(D), p + "pre_residual.weight": ones(D),
            p + "post_layernorm.weight": ones(D), p + "post_residual.weight": ones(D),
            p + "self_attn.q_proj.weight": w(N * H, D), p + "self_attn.k_proj.weight": w(K * H, D),
            p + "self_attn.v_proj.weight": w(K * H, D), p + "self_attn.o_proj.weight": w(D, N * H),
            p + "self_attn.A": w(N, scale=1.0), p + "self_attn.dt_proj.weight": w(N, K * H, scale=0.3),
            p + "feed_forward.gate_proj.weight": w(F, D), p + "feed_forward.up_proj.weight": w(F, D),
            p + "feed_forward.down_proj.weight": w(D, F),
        })
        if cfg["is_moe"]:  # CDMoE as in Doge-40M-MoE (August 2025): product-key router, expert embeddings
            E = cfg["num_experts"]
            out.update({p + "feed_forward.router_gate.weight": w(2 * int(np.sqrt(E)), D),
                        p + "feed_forward.down_embed.weight": w(E, D), p + "feed_forward.up_embed.weight": w(E, D)})
    return out


def renamed(key: str) -> str:
    """The August 2025 names (SmallDoge's convert_doge_weights_to_hf.py), written out independently of convert/."""
    for old, new in (("model.word_embed.", "model.embed_tokens."), ("model.final_layernorm.", "model.norm."),
                     (".pre_layernorm.", ".input_layernorm."), (".post_layernorm.", ".post_attention_layernorm."),
                     (".feed_forward.", ".mlp.")):
        key = key.replace(old, new)
    for old, new in ((".pre_residual.weight", ".input_residual"),
                     (".post_residual.weight", ".post_attention_residual")):
        if key.endswith(old):
            key = key[: -len(old)] + new
    return key


def write_published(path, generation: str, tok, seed: int = 0, drop: tuple[str, ...] = (), **overrides):
    """A Hub folder as published: config.json, model.safetensors, the tokenizer with its chat template."""
    cfg = published_config(generation, len(tok), tok, drop, **overrides)
    weights = original_weights(cfg, seed)
    stored = weights if generation == "original" else {renamed(k): v for k, v in weights.items()}
    path.mkdir(parents=True)
    save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(path)
    return cfg, weights


# --- the reference -----------------------------------------------------------------------------------------------

def published_forward(w: dict, cfg: dict, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits [B, T, V] of SmallDoge's original DogeForCausalLM, float64, from the original weight names."""
    B, T = ids.shape
    eps, R = cfg["rms_norm_eps"], N // K

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def linear(x, name):
        return x @ w[name].astype(np.float64).T

    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, H, 2) / H)  # T ≤ max_position_embeddings: no NTK scaling
    ang = np.arange(T)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))  # [T, H]

    def rope(x):  # x [B, T, heads, H]
        rotated = np.concatenate([-x[..., H // 2:], x[..., : H // 2]], -1)
        return x * cos[None, :, None] + rotated * sin[None, :, None]

    allowed = np.tril(np.ones((T, T), bool))[None]  # [1, T, S]
    if mask is not None:
        allowed = allowed & mask[:, None, :].astype(bool)
    x = w["model.word_embed.weight"].astype(np.float64)[ids]  # [B, T, D]
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "pre_layernorm.weight"])
        q = rope(linear(h, p + "self_attn.q_proj.weight").reshape(B, T, N, H))
        k = rope(linear(h, p + "self_attn.k_proj.weight").reshape(B, T, K, H))
        v = linear(h, p + "self_attn.v_proj.weight").reshape(B, T, K, H)
        dt_raw = linear(v.reshape(B, T, K * H), p + "self_attn.dt_proj.weight")  # [B, T, N]
        dt = np.exp(w[p + "self_attn.A"] * np.logaddexp(0.0, dt_raw))  # exp(A · softplus)
        bias = np.where(allowed[:, None], dt.transpose(0, 2, 1)[:, :, None, :], -np.inf)  # [B, N, T, S]
        window = cfg.get("keep_window_size", 2048)  # absent from the February 2025 files: transformers' default
        if T > window:  # transformers' window: the keep_window_size largest biases per query
            thr = np.sort(bias, -1)[..., -window][..., None]
            bias = np.where(bias >= thr, bias, -np.inf)
        k_rep, v_rep = np.repeat(k, R, axis=2), np.repeat(v, R, axis=2)  # query head n reads kv head n // R
        scores = np.einsum("btnh,bsnh->bnts", q, k_rep) * H**-0.5 + bias
        scores = np.where(np.isfinite(scores), scores, -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("bnts,bsnh->btnh", probs, v_rep).reshape(B, T, N * H)
        x = w[p + "pre_residual.weight"] * x + linear(attn, p + "self_attn.o_proj.weight")
        h = rms(x, w[p + "post_layernorm.weight"])
        gate = linear(h, p + "feed_forward.gate_proj.weight")
        mlp = linear(gate / (1 + np.exp(-gate)) * linear(h, p + "feed_forward.up_proj.weight"),
                     p + "feed_forward.down_proj.weight")
        x = w[p + "post_residual.weight"] * x + mlp
    x = rms(x, w["model.final_layernorm.weight"])
    head = w["model.word_embed.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.astype(np.float64).T


def distinct_ids(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(vocab)[:length] for _ in range(batch)]).astype(np.int32)


def torch_logits(model, ids, mask=None) -> np.ndarray:
    kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask.astype(np.int64))}
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64)), **kwargs).logits.double().numpy()


def jax_logits(model, ids, mask=None) -> np.ndarray:
    kwargs = {} if mask is None else {"attention_mask": jnp.asarray(mask)}
    return np.asarray(model(jnp.asarray(ids), **kwargs).logits, np.float64)


# --- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from serve_testing import make_tokenizer

    return make_tokenizer(vocab_size=512)


_built: dict[str, tuple] = {}


def _published(generation: str, tok, tmp_path_factory) -> tuple:
    """Built once per generation: (generation, config.json, original-named weights, Hub folder, from_hf workdir,
    to_hf folder)."""
    if generation not in _built:
        root = tmp_path_factory.mktemp(generation)
        cfg, weights = write_published(root / "hub", generation, tok, seed=len(generation))
        ckpt = convert.from_hf(str(root / "hub"), str(root / "ckpt"))
        export = convert.to_hf(ckpt, str(root / "hf"))
        _built[generation] = generation, cfg, weights, root / "hub", ckpt, export
    return _built[generation]


@pytest.fixture(scope="module", params=["original", "renamed"])
def published(request, tok, tmp_path_factory):
    return _published(request.param, tok, tmp_path_factory)


@pytest.fixture(scope="module")
def original_export(tok, tmp_path_factory) -> str:
    return _published("original", tok, tmp_path_factory)[5]


@pytest.fixture(scope="module")
def exported_model(published):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(published[5], trust_remote_code=True).eval()


# --- conversion --------------------------------------------------------------------------------------------------

def test_from_hf_computes_the_published_math(published):
    generation, cfg, weights, _, ckpt, _ = published
    model = doge_jax.load_model(ckpt)
    assert (model.cfg.qk_norm, model.cfg.dt_heads, model.cfg.rope_type, model.cfg.rope_factor) == \
        (False, "attention", "dynamic", 4.0)
    ids = distinct_ids(2, 24, cfg["vocab_size"], seed=1)
    err = np.abs(jax_logits(model, ids) - published_forward(weights, cfg, ids)).max()
    print(f"{generation}: doge-jax vs published math, max abs logit error {err:.2e}")
    assert err <= LOGIT_ATOL


def test_export_loads_in_transformers_with_its_remote_code(published, exported_model):
    generation, cfg, weights, _, ckpt, export = published
    names = set(os.listdir(export))
    assert {"config.json", "configuration_doge_legacy.py", "modeling_doge_legacy.py", "generation_config.json",
            "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert type(exported_model).__name__ == "DogeLegacyForCausalLM"
    assert not hasattr(exported_model.model.layers[0].self_attn, "q_norm")
    assert exported_model.model.layers[0].self_attn.A.shape == (N,)
    ids = distinct_ids(2, 24, cfg["vocab_size"], seed=2)
    ref = published_forward(weights, cfg, ids)
    out = torch_logits(exported_model, ids)
    mine = jax_logits(doge_jax.load_model(ckpt), ids)
    print(f"{generation}: transformers export vs published math {np.abs(out - ref).max():.2e}, "
          f"vs doge-jax {np.abs(out - mine).max():.2e}")
    assert np.abs(out - ref).max() <= LOGIT_ATOL and np.abs(out - mine).max() <= LOGIT_ATOL


def test_export_matches_on_padded_batches(published, exported_model):
    _, cfg, weights, _, ckpt, _ = published
    ids = distinct_ids(3, 16, cfg["vocab_size"], seed=3)
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding, as batched serving does
    mask[1, :2] = 0
    ref = published_forward(weights, cfg, ids, mask)
    out = torch_logits(exported_model, ids, mask)
    mine = jax_logits(doge_jax.load_model(ckpt), ids, mask)
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= LOGIT_ATOL and np.abs(mine - ref)[valid].max() <= LOGIT_ATOL


def test_export_greedy_generate_equals_doge_jax(published, exported_model):
    _, cfg, _, _, ckpt, _ = published
    model = doge_jax.load_model(ckpt)
    prompt = distinct_ids(1, 7, cfg["vocab_size"], seed=4)
    with torch.no_grad():
        generated = exported_model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=10,
                                            do_sample=False)[0, prompt.shape[1]:].tolist()
    # doge-jax greedy: argmax of a full forward, one token at a time. One fixed-length buffer (one compile): the
    # positions past the current one are causally invisible to it.
    start = prompt.shape[1]
    ids = np.zeros((1, start + len(generated)), np.int32)
    ids[:, :start] = prompt
    for pos in range(start, ids.shape[1]):
        ids[0, pos] = int(np.argmax(jax_logits(model, ids)[0, pos - 1]))
    assert len(generated) >= 1 and ids[0, start:].tolist() == generated


def test_top_k_window_past_keep_window_size(tok, tmp_path):
    """keep_window_size < T: the export's per-attention-head window equals doge-jax's and the reference's."""
    from transformers import AutoModelForCausalLM

    cfg, weights = write_published(tmp_path / "hub", "renamed", tok, seed=5, keep_window_size=8)
    ckpt = convert.from_hf(str(tmp_path / "hub"), str(tmp_path / "ckpt"))
    model = AutoModelForCausalLM.from_pretrained(convert.to_hf(ckpt, str(tmp_path / "hf")),
                                                 trust_remote_code=True).eval()
    ids = distinct_ids(2, 30, cfg["vocab_size"], seed=6)
    ref = published_forward(weights, cfg, ids)
    out, mine = torch_logits(model, ids), jax_logits(doge_jax.load_model(ckpt), ids)
    print(f"window 8 of 30: transformers {np.abs(out - ref).max():.2e}, doge-jax {np.abs(mine - ref).max():.2e}")
    assert np.abs(out - ref).max() <= LOGIT_ATOL and np.abs(mine - ref).max() <= LOGIT_ATOL


def test_first_layout_moe_checkpoint(tok, tmp_path):
    """CDMoE in the first layout (Doge-40M-MoE, August 2025 names): export vs doge-jax, whose CDMoE test_parity.py
    checks against transformers' (with transformers' router layout, which imported checkpoints keep)."""
    from transformers import AutoModelForCausalLM

    cfg, _ = write_published(tmp_path / "hub", "renamed", tok, seed=12, is_moe=True, num_experts=16,
                             num_experts_per_tok=4)
    ckpt = convert.from_hf(str(tmp_path / "hub"), str(tmp_path / "ckpt"))
    mine = doge_jax.load_model(ckpt)
    assert mine.cfg.is_moe and mine.cfg.router_layout == "transformers"
    model = AutoModelForCausalLM.from_pretrained(convert.to_hf(ckpt, str(tmp_path / "hf")),
                                                 trust_remote_code=True).eval()
    ids = distinct_ids(2, 16, cfg["vocab_size"], seed=13)
    err = np.abs(torch_logits(model, ids) - jax_logits(mine, ids)).max()
    print(f"first-layout CDMoE: export vs doge-jax {err:.2e}")
    assert err <= LOGIT_ATOL


def test_mha_export_equals_native_doge_without_qk_norm(tmp_path):
    """A second, transformers-made reference: with as many kv heads as heads, the first layout is native Doge
    with q/k norm taken out (per-head and per-kv-head dt are then the same thing)."""
    from transformers import AutoModelForCausalLM, DogeConfig, DogeForCausalLM

    torch.manual_seed(8)
    native = DogeForCausalLM(DogeConfig(vocab_size=96, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                        num_attention_heads=N, num_key_value_heads=N, keep_window_size=8,
                                        tie_word_embeddings=False)).float().eval()
    with torch.no_grad():
        for layer in native.model.layers:
            layer.self_attn.A.normal_(0.0, 1.0)
            layer.input_residual.normal_(1.0, 0.3)
            layer.self_attn.q_norm, layer.self_attn.k_norm = torch.nn.Identity(), torch.nn.Identity()
    native.save_pretrained(tmp_path / "hub")  # no q_norm / k_norm weights left: the first layout's files
    assert not any("q_norm" in k for k in load_file(str(tmp_path / "hub" / "model.safetensors")))
    ckpt = convert.from_hf(str(tmp_path / "hub"), str(tmp_path / "ckpt"))
    export = AutoModelForCausalLM.from_pretrained(convert.to_hf(ckpt, str(tmp_path / "hf")),
                                                  trust_remote_code=True).eval()
    ids = distinct_ids(2, 20, 96, seed=9)  # 20 > keep_window_size: the top-k path too
    err = np.abs(torch_logits(export, ids) - torch_logits(native, ids)).max()
    print(f"MHA: export vs native Doge without q/k norm {err:.2e}")
    assert err <= LOGIT_ATOL


def test_first_layout_model_made_here_exports(tmp_path):
    """No source config.json to keep: the export writes the published field set from the model config alone
    (linear RoPE and biases, to exercise those keys)."""
    from transformers import AutoModelForCausalLM

    from doge_jax import checkpoint as ckpt_lib
    from doge_jax.model import decoder as model_lib

    cfg = doge_jax.DogeConfig(vocab_size=80, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                              num_attention_heads=N, num_key_value_heads=K, max_position_embeddings=64,
                              keep_window_size=10, rope_type="linear", rope_factor=2.0, rope_theta=500.0,
                              attention_bias=True, mlp_bias=True, qk_norm=False, dt_heads="attention")
    rng = np.random.default_rng(10)

    def random_like(tree, name=""):  # norms / residual scales near 1, A ~ N(0, 1), the rest small
        if isinstance(tree, dict):
            return {k: random_like(v, str(k)) for k, v in tree.items()}
        base, scale = (1.0, 0.3) if name in ("weight", "input_residual", "post_attention_residual") else \
            (0.0, 1.0 if name == "A" else 0.1)
        return (base + scale * rng.standard_normal(tree.shape)).astype(np.float32)

    params = random_like(ckpt_lib.params_of(model_lib.abstract_model(cfg)))
    ckpt_lib.save_params(str(tmp_path / "ck"), 0, params, cfg)
    export = convert.to_hf(str(tmp_path / "ck"), str(tmp_path / "hf"))
    written = json.loads(open(os.path.join(export, "config.json")).read())
    assert written["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and written["rope_theta"] == 500.0
    assert written["attention_bias"] is written["mlp_bias"] is True and "hidden_bias" not in written
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    ids = distinct_ids(2, 24, 80, seed=11)
    err = np.abs(torch_logits(model, ids) - jax_logits(doge_jax.load_model(str(tmp_path / "ck")), ids)).max()
    print(f"made here (linear RoPE, biases, window 10 of 24): export vs doge-jax {err:.2e}")
    assert err <= LOGIT_ATOL


def test_round_trip_is_bit_exact(published, tmp_path):
    generation, cfg, weights, hub, ckpt, export = published
    exported = load_file(os.path.join(export, "model.safetensors"))
    source = load_file(str(hub / "model.safetensors"))
    expected = {renamed(k): v for k, v in source.items()}
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    written = json.loads(open(os.path.join(export, "config.json")).read())
    for key, value in cfg.items():
        if key not in EXPORT_OWNED:
            assert written[key] == value, f"{generation}: config.json {key}={written.get(key)!r}, published {value!r}"
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_doge_legacy.DogeLegacyForCausalLM"
    # A second trip through doge-jax changes nothing but the writer's version.
    again = convert.to_hf(convert.from_hf(export, str(tmp_path / "ckpt2")), str(tmp_path / "hf2"))
    second = load_file(os.path.join(again, "model.safetensors"))
    assert sorted(second) == sorted(exported) and all(np.array_equal(second[k], exported[k]) for k in exported)
    assert json.loads(open(os.path.join(again, "config.json")).read()) == written


def test_february_2025_config(tok, tmp_path):
    """The earliest published config.json (small-doge configuration_doge.py, February 2025): no keep_window_size,
    the first CDMoE's keys (unused by a dense model). It converts, computes the published math and comes back."""
    cfg, weights = write_published(
        tmp_path / "hub", "original", tok, seed=14, num_cdmoe_experts=16348, num_cdmoe_heads=4,
        num_cdmoe_experts_per_head=8, expert_retrieval_size=64,
        drop=("keep_window_size", "num_experts", "num_experts_per_tok", "norm_topk_prob", "output_router_logits",
              "router_aux_loss_coef"))
    ckpt = convert.from_hf(str(tmp_path / "hub"), str(tmp_path / "ckpt"))
    ids = distinct_ids(1, 20, cfg["vocab_size"], seed=15)
    assert np.abs(jax_logits(doge_jax.load_model(ckpt), ids) - published_forward(weights, cfg, ids)).max() <= LOGIT_ATOL
    written = json.loads(open(os.path.join(convert.to_hf(ckpt, str(tmp_path / "hf")), "config.json")).read())
    assert all(written[k] == v for k, v in cfg.items() if k not in EXPORT_OWNED)
    assert written["keep_window_size"] == 2048  # what transformers reads when the key is absent, now explicit


def test_bfloat16_checkpoint_round_trips_bit_exactly(tok, tmp_path):
    import ml_dtypes

    cfg, weights = write_published(tmp_path / "hub", "renamed", tok, seed=7, torch_dtype="bfloat16")
    path = tmp_path / "hub" / "model.safetensors"
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(str(path)).items()}
    save_file(bf16, str(path), metadata={"format": "pt"})
    out = convert.to_hf(convert.from_hf(str(tmp_path / "hub"), str(tmp_path / "ckpt")), str(tmp_path / "hf"),
                        dtype="bfloat16")
    back = load_file(os.path.join(out, "model.safetensors"))
    assert all(back[k].dtype == bf16[k].dtype and np.array_equal(back[k].view(np.uint16), bf16[k].view(np.uint16))
               for k in bf16) and sorted(back) == sorted(bf16)
    written = json.loads(open(os.path.join(out, "config.json")).read())
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"


@pytest.mark.parametrize("change, message", [
    (dict(dynamic_mask_ratio=0.1), "dynamic_mask_ratio=0.1 is not supported"),
    (dict(is_moe=True, num_cdmoe_experts=16348, num_cdmoe_heads=4), "SmallDoge's first CDMoE"),
])
def test_unsupported_published_options_are_one_line_errors(tok, tmp_path, change, message):
    write_published(tmp_path / "hub", "original", tok, **change)
    with pytest.raises(ValueError, match=message) as exc:
        convert.from_hf(str(tmp_path / "hub"), str(tmp_path / "ckpt"))
    assert "\n" not in str(exc.value) and not (tmp_path / "ckpt").exists()


def test_unknown_original_weight_is_a_one_line_error(tok, tmp_path):
    write_published(tmp_path / "hub", "original", tok)
    path = tmp_path / "hub" / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.0.feed_forward.router_gate.bias"] = np.zeros(4, np.float32)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"'model.layers.0.feed_forward.router_gate.bias' of the original"):
        convert.from_hf(str(tmp_path / "hub"), str(tmp_path / "ckpt"))


def test_mixed_layout_is_refused_by_to_hf(tmp_path):
    from doge_jax import checkpoint as ckpt_lib
    from doge_jax.model import decoder as model_lib

    cfg = doge_jax.DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, qk_norm=True, dt_heads="attention")
    params = _zeros_like(ckpt_lib.params_of(model_lib.abstract_model(cfg)))
    ckpt_lib.save_params(str(tmp_path / "ck"), 0, params, cfg)
    with pytest.raises(ValueError, match="qk_norm=True, dt_heads='attention': neither"):
        convert.to_hf(str(tmp_path / "ck"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def _zeros_like(tree):
    return {k: _zeros_like(v) if isinstance(v, dict) else np.zeros(v.shape, v.dtype) for k, v in tree.items()}


def test_modeling_file_refuses_a_ratio_it_does_not_compute():
    from convert.legacy.configuration_doge_legacy import DogeLegacyConfig

    with pytest.raises(ValueError, match="dynamic_mask_ratio=0.2"):
        DogeLegacyConfig(dynamic_mask_ratio=0.2)


# --- serving -----------------------------------------------------------------------------------------------------

def test_served_with_trust_remote_code(original_export, tok, tmp_path):
    import openai
    from transformers import AutoModelForCausalLM

    server = ServerProcess(original_export, tmp_path / "server.log", "--trust-remote-code", "--threads", "1",
                           "--max-batch", "2", "--dtype", "float32")  # float32: the text must be generate's
    try:
        server.wait_ready()
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            chat = client.chat.completions.create(model="tiny-doge", max_tokens=8, temperature=0,
                                                  messages=[{"role": "user", "content": "Hello there"}],
                                                  extra_body={"ignore_eos": True})
            prompt = tok("The quick brown fox")["input_ids"]
            text = client.completions.create(model="tiny-doge", prompt=prompt, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text
    finally:
        server.stop()
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 8
    assert chat.choices[0].finish_reason == "length"
    model = AutoModelForCausalLM.from_pretrained(original_export, trust_remote_code=True).eval()
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert text == tok.decode(ids[0, len(prompt):])


def test_static_decode_path_equals_generate(tok, tmp_path):
    """The server's default decode path (fixed slots + the hand-written step) runs the first layout: no q/k norm,
    dt per attention head cached as [slots, N, capacity]. Greedy tokens equal the export's `generate` for two
    prompts decoding together, one past keep_window_size (the per-head top-k mask)."""
    from transformers import AutoModelForCausalLM

    from serve.decode_step import DecodeStep
    from serve.engine import Engine
    from serve.kv_batch import KVBatch
    from serve.static_cache import SlotBatch

    cfg, _ = write_published(tmp_path / "hub", "renamed", tok, seed=7, keep_window_size=8)
    export = convert.to_hf(convert.from_hf(str(tmp_path / "hub"), str(tmp_path / "ckpt")), str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    prompts = [distinct_ids(1, n, cfg["vocab_size"], seed=n)[0].tolist() for n in (5, 14)]
    new = 12
    with torch.inference_mode():
        expected = [model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    batch = SlotBatch(DecodeStep(model), slots=2, max_len=64)
    prefill, logits = KVBatch(model).prefill(prompts)  # left-padded together, then copied into slots
    batch.merge(prefill)
    assert batch.cache.dts[0].shape[1] == N  # one bias row per attention head
    produced = [[int(row.argmax())] for row in logits]
    for _ in range(new - 1):
        logits = batch.decode([p[-1] for p in produced])
        for p, row in zip(produced, logits):
            p.append(int(row.argmax()))
    assert produced == expected
    engine = Engine(AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval(), tok,
                    threads=torch.get_num_threads())
    assert engine.decode_path == "static"


def test_serving_without_the_flag_is_a_one_line_error(original_export):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "serve", "--model", original_export, "--port", str(_free_port())],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: model={original_export!r} ships its own modeling code (config.json auto_map: "
        f"modeling_doge_legacy.DogeLegacyForCausalLM); pass --trust-remote-code to run it")
    assert "Traceback" not in out.stderr


def test_shipped_remote_code_imports_only_torch_and_transformers():
    """It runs on serving boxes without jax (serve/ never imports it) and without this project installed."""
    import ast

    from convert.legacy import layout

    allowed = {"__future__", "collections", "torch", "transformers", "huggingface_hub"}
    here = os.path.dirname(layout.__file__)
    for name in layout.REMOTE_CODE:
        tree = ast.parse(open(os.path.join(here, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {node.module.split(".")[0]}  # relative: its sibling file
            else:
                continue
            assert roots <= allowed, f"{name} imports {roots - allowed}"


def test_original_remote_code_gets_a_conversion_hint(tok, tmp_path):
    """The Hub repos' own modeling_doge.py imports names transformers 5 removed (LossKwargs)."""
    from serve.loading import load

    write_published(tmp_path / "hub", "original", tok)
    (tmp_path / "hub" / "configuration_doge.py").write_text("from transformers.utils import LossKwargs\n")
    (tmp_path / "hub" / "modeling_doge.py").write_text("from transformers.utils import LossKwargs\n")
    with pytest.raises(ImportError, match=r"does not import under transformers .*python -m convert from-hf") as exc:
        load(str(tmp_path / "hub"), trust_remote_code=True)
    assert "\n" not in str(exc.value)
