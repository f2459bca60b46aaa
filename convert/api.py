"""`from_hf` and `to_hf`: the two directions, shared by the CLI (`python -m convert`) and the tests."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from convert import hf
from doge_jax import checkpoint as ckpt
from doge_jax import model as model_lib
from doge_jax.eval import results as eval_results

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def _local_or_hub(src: str, revision: str | None = None) -> str:
    """A local folder as is; otherwise a Hub repo id fetched with huggingface_hub (uses HF_TOKEN if set)."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise ValueError(f"hf={src!r} is a file; pass the folder holding config.json")
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise FileNotFoundError(f"hf={src!r} is neither a local folder nor a Hub id like 'SmallDoge/Doge-20M'")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=src, revision=revision, allow_patterns=HUB_PATTERNS)


def from_hf(src: str, out_dir: str, *, revision: str | None = None, overwrite: bool = False,
            step: int = 0, **config_overrides) -> str:
    """A transformers Doge checkpoint (folder or Hub id) → doge-jax workdir `out_dir` (Orbax, step `step`).

    The workdir holds checkpoints/<step>/{params, model_config} and tokenizer/ when the source has one;
    `doge_jax.load_model(out_dir)` and training (`--config.init_from=out_dir`) read it."""
    path = _local_or_hub(src, revision)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"hf={src!r}: missing file config.json")
    with open(cfg_path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = hf.config_from_hf(raw, cfg_path)
    state = hf.read_safetensors_dir(path)
    cfg = hf.detect_layout(state, cfg)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    expected = ckpt.params_of(model_lib.abstract_model(cfg))
    params = hf.params_from_hf(state, expected, source=path)
    with hf.AtomicDir(out_dir, overwrite=overwrite) as tmp:
        ckpt.save_params(tmp, step, params, cfg)
        hf.copy_tokenizer_files(path, os.path.join(tmp, ckpt.TOKENIZER))
    return os.path.abspath(out_dir)


def to_hf(checkpoint: str, out_dir: str, *, dtype: str = "float32", step: int | None = None,
          push_to_hub: str | None = None, max_shard_size: str | int = "2GB", overwrite: bool = False,
          hub_api: Any = None, private: bool = False) -> str:
    """A doge-jax checkpoint (workdir, checkpoints/ folder or step folder) → transformers folder `out_dir`.

    Writes config.json, generation_config.json, safetensors (sharded past max_shard_size), the tokenizer when
    the checkpoint has one, and a model card. With push_to_hub="org/name", uploads the folder too."""
    import ml_dtypes

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r} must be one of ['float32', 'bfloat16', 'float16']")
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    max_bytes = hf.parse_size(max_shard_size)
    ref = ckpt.resolve(checkpoint, step)
    cfg = ckpt.load_config(ref)
    hf_cfg = hf.config_to_hf(cfg, dtype)
    params = ckpt.load_params(ref, ckpt.params_of(model_lib.abstract_model(cfg)))
    state = {k: np.asarray(v).astype(np_dtype) for k, v in hf.params_to_hf(params).items()}
    with hf.AtomicDir(out_dir, overwrite=overwrite) as tmp:
        hf_cfg.save_pretrained(tmp)
        _generation_config(cfg).save_pretrained(tmp)
        hf.write_safetensors(state, tmp, max_bytes)
        has_tok = ref.tokenizer_dir is not None and hf.copy_tokenizer_files(ref.tokenizer_dir, tmp)
        _model_card(tmp, cfg, ref, dtype, has_tok, push_to_hub)
    if push_to_hub:
        upload(out_dir, push_to_hub, api=hub_api, private=private)
    return os.path.abspath(out_dir)


def upload(folder: str, repo_id: str, *, api: Any = None, private: bool = False) -> str:
    """Uploads an exported folder to the Hub (token from HF_TOKEN). Returns the commit URL."""
    if repo_id.count("/") != 1:
        raise ValueError(f"push_to_hub={repo_id!r} must look like 'org/name'")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=os.environ.get("HF_TOKEN"))
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                             commit_message="Upload Doge model exported by doge-jax")
    return str(getattr(info, "commit_url", info))


def _generation_config(cfg):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                            pad_token_id=cfg.pad_token_id, max_length=cfg.max_position_embeddings)


def _model_card(out: str, cfg, ref, dtype: str, has_tokenizer: bool, repo_id: str | None) -> None:
    n = model_lib.count_params(cfg)
    name = repo_id or os.path.basename(os.path.abspath(ref.workdir))
    meta = ["library_name: transformers", "pipeline_tag: text-generation", "tags: [doge, doge-jax]"]
    evals = eval_results.read_card_entries(ref.workdir)  # written by `python -m doge_jax.eval` / training
    if evals:
        meta.append("model-index: " + json.dumps(eval_results.model_index(evals, name)))  # JSON is YAML too
    lines = [
        "---", *meta, "---", f"# {name}", "",
        f"A Doge causal language model ({n / 1e6:.1f}M parameters) trained with doge-jax and exported at step "
        f"{ref.step} in {dtype}. It loads with transformers' native `DogeForCausalLM` (no `trust_remote_code`).",
        "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained({name!r})",
    ]
    if has_tokenizer:
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({name!r})")
    lines += ["```", "", "| field | value |", "|---|---|"]
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "keep_window_size", "is_moe"):
        lines.append(f"| {field} | {getattr(cfg, field)} |")
    if cfg.is_moe and cfg.router_layout == "per_token":
        lines += ["", "Trained with per-token product-key routing. transformers' full-forward prefill pairs router "
                  "scores across tokens (`view(2, B*T, -1)`), so its prefill logits differ slightly from training; "
                  "token-by-token decoding with batch 1 matches exactly."]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
