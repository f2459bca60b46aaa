"""The converter both ways, its CLI, Hub upload and its errors (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

import convert
import doge_jax
from doge_jax import checkpoint as ckpt
from doge_jax.model import decoder as model_lib
from doge_jax.data import load_tokenizer
from hf_reference import random_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, keep_window_size=16, bos_token_id=1, eos_token_id=2,
            pad_token_id=3)


def _workdir(tmp_path, name="run", seed=0, with_tokenizer=True, **overrides):
    """A doge-jax checkpoint with random weights (A and residuals randomised so every parameter matters)."""
    cfg = doge_jax.DogeConfig(**{**TINY, **overrides})
    model = model_lib.build(cfg, seed=seed)
    params = ckpt.params_of(model)
    rng = np.random.default_rng(seed)
    for layer in params["layers"].values():
        layer["self_attn"]["A"] = jnp.asarray(rng.normal(size=layer["self_attn"]["A"].shape), jnp.float32)
        layer["input_residual"] = jnp.asarray(1 + 0.2 * rng.normal(size=(cfg.hidden_size,)), jnp.float32)
    workdir = str(tmp_path / name)
    ckpt.save_params(workdir, 7, params, cfg)
    if with_tokenizer:
        load_tokenizer("default").save_pretrained(os.path.join(workdir, ckpt.TOKENIZER))
    return workdir, ckpt.with_params(model_lib.abstract_model(cfg), params)


def _flat_params(model):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("overrides", [dict(), dict(tie_word_embeddings=True),
                                       dict(is_moe=True, num_experts=64, num_experts_per_tok=4)],
                         ids=["untied", "tied", "moe_per_token"])
def test_jax_hf_jax_is_bit_exact(overrides, tmp_path):
    workdir, model = _workdir(tmp_path, **overrides)
    hf_dir = convert.to_hf(workdir, str(tmp_path / "hf"))
    back = doge_jax.load_model(convert.from_hf(hf_dir, str(tmp_path / "back")))
    assert back.cfg == model.cfg  # router_layout etc. survive the trip through config.json
    for a, b in zip(_flat_params(model), _flat_params(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_loads_in_transformers_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    workdir, model = _workdir(tmp_path)
    hf_dir = convert.to_hf(workdir, str(tmp_path / "hf"))
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert os.path.isfile(os.path.join(hf_dir, name)), name
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf_model).__name__ == "DogeForCausalLM"
    ids = random_ids(2, 12, 8192, seed=1)
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids)).logits), ref, atol=2e-5, rtol=0)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    gen = pipeline("text-generation", model=hf_dir, tokenizer=tok, device="cpu")
    text = gen("The quick brown fox", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The quick brown fox") and len(text) > len("The quick brown fox")


def test_bfloat16_and_sharded_export(tmp_path):
    from transformers import AutoModelForCausalLM

    workdir, model = _workdir(tmp_path, with_tokenizer=False)
    step_dir = os.path.join(workdir, "checkpoints", "7")  # one step's folder is accepted too
    hf_dir = convert.to_hf(step_dir, str(tmp_path / "hf"), dtype="bfloat16", max_shard_size="600KB")
    index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    assert not os.path.exists(os.path.join(hf_dir, "tokenizer.json"))
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert hf_model.dtype == torch.bfloat16
    ours = np.asarray(model.embed_tokens[...]).astype(np.float32)
    theirs = hf_model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_allclose(theirs, ours, rtol=2**-8, atol=0)


def test_hub_upload_without_network(tmp_path):
    calls = []

    class RecordingHubApi:  # stands in for huggingface_hub.HfApi: the Hub itself is out of reach here
        def create_repo(self, **kw):
            calls.append(("create_repo", kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw, sorted(os.listdir(kw["folder_path"]))))
            return "https://huggingface.co/org/tiny/commit/0"

    workdir, _ = _workdir(tmp_path)
    convert.to_hf(workdir, str(tmp_path / "hf"), push_to_hub="org/tiny", hub_api=RecordingHubApi())
    assert calls[0] == ("create_repo", dict(repo_id="org/tiny", repo_type="model", private=False, exist_ok=True))
    assert calls[1][1]["repo_id"] == "org/tiny" and "model.safetensors" in calls[2 - 1][2]
    with pytest.raises(ValueError, match="push_to_hub='tiny'"):
        convert.upload(str(tmp_path / "hf"), "tiny", api=RecordingHubApi())


def test_older_smalldoge_layout_loads_from_its_weights(tmp_path):
    """No q/k norm and A/dt_proj per attention head: from_hf reads the layout off the weights."""
    from convert import hf as hf_lib
    from safetensors.numpy import save_file

    cfg = doge_jax.DogeConfig(**TINY, qk_norm=False, dt_heads="attention")
    model = model_lib.build(cfg, seed=3)
    state = hf_lib.params_to_hf(ckpt.params_of(model))
    assert state["model.layers.0.self_attn.A"].shape == (4,)
    src = tmp_path / "old"
    src.mkdir()
    save_file({k: np.asarray(v) for k, v in state.items()}, str(src / "model.safetensors"))
    raw = {k: getattr(cfg, k) for k in hf_lib.HF_TO_JAX_FIELDS}
    raw.update(model_type="doge", rope_theta=10000.0, rope_scaling=None)
    (src / "config.json").write_text(json.dumps(raw))
    back = doge_jax.load_model(convert.from_hf(str(src), str(tmp_path / "ck")))
    assert (back.cfg.qk_norm, back.cfg.dt_heads) == (False, "attention")
    ids = jnp.asarray(random_ids(1, 10, 8192))
    np.testing.assert_array_equal(np.asarray(back(ids).logits), np.asarray(model(ids).logits))
    # transformers 5's Doge cannot hold it: the export ships its own modeling file (tests/test_legacy_layout.py).
    out = convert.to_hf(str(tmp_path / "ck"), str(tmp_path / "out"))
    assert json.load(open(os.path.join(out, "config.json")))["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_doge_legacy.DogeLegacyForCausalLM"


def _no_leftovers(parent):
    return not [n for n in os.listdir(parent) if ".tmp-" in n]


def test_bad_inputs_give_one_line_errors_and_no_partial_output(tmp_path):
    from transformers import LlamaConfig

    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=50).save_pretrained(llama)
    with pytest.raises(ValueError, match="model_type='llama' is not a Doge model"):
        convert.from_hf(str(llama), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="missing file config.json"):
        convert.from_hf(str(tmp_path), str(tmp_path / "b"))

    workdir, _ = _workdir(tmp_path, with_tokenizer=False)
    hf_dir = convert.to_hf(workdir, str(tmp_path / "hf"))
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"mlp.down_proj.weight' has shape \(64, 96\), the config implies \(64, 128\)"):
        convert.from_hf(hf_dir, str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c") and _no_leftovers(tmp_path)

    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        convert.to_hf(str(tmp_path / "llama"), str(tmp_path / "d"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="is not writable"):
        convert.to_hf(workdir, str(blocker / "sub"))
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        convert.to_hf(workdir, hf_dir)
    with pytest.raises(ValueError, match="dtype='int8'"):
        convert.to_hf(workdir, str(tmp_path / "e"), dtype="int8")
    assert _no_leftovers(tmp_path)


def test_cli_round_trip_and_error_exit(tmp_path):
    workdir, model = _workdir(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "convert", *a], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run("to-hf", "--checkpoint", workdir, "--out", str(tmp_path / "hf"), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    r = run("from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "back" / "tokenizer" / "tokenizer.json")
    r = run("from-hf", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "hf=" in r.stderr, r.stderr
