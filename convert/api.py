"""`from_hf` and `to_hf`: the two directions, shared by the CLI (`python -m convert`) and the tests."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import numpy as np

from convert import hf
from convert.legacy import layout as legacy
from doge_jax import checkpoint as ckpt, storage
from doge_jax.eval import results as eval_results
from doge_jax.model import decoder as model_lib

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
    storage.path(out_dir, field="out")  # an unsupported scheme fails before anything is downloaded
    path = _local_or_hub(src, revision)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"hf={src!r}: missing file config.json")
    with open(cfg_path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = hf.config_from_hf(legacy.normalize_config(raw, cfg_path), cfg_path)
    state = legacy.rename_first_generation(hf.read_safetensors_dir(path), path)
    cfg = hf.detect_layout(state, cfg)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    expected = ckpt.params_of(model_lib.abstract_model(cfg))
    params = hf.params_from_hf(state, expected, source=path)
    if storage.is_remote(out_dir):  # Orbax writes gs:// itself and commits the step last; the tokenizer goes first
        _check_remote_out(out_dir, overwrite, ckpt.CHECKPOINTS)
        with storage.local_folder(storage.join(out_dir, ckpt.TOKENIZER)) as tmp:
            hf.copy_tokenizer_files(path, tmp)
        if legacy.is_first_layout(cfg):
            storage.write_bytes_atomic(storage.join(out_dir, legacy.SOURCE_CONFIG),
                                       json.dumps(raw, indent=2, sort_keys=True).encode())
        ckpt.save_params(out_dir, step, params, cfg)
        return str(storage.path(out_dir))
    with hf.AtomicDir(out_dir, overwrite=overwrite) as tmp:
        ckpt.save_params(tmp, step, params, cfg)
        hf.copy_tokenizer_files(path, os.path.join(tmp, ckpt.TOKENIZER))
        if legacy.is_first_layout(cfg):
            legacy.keep_source_config(tmp, raw)
    return os.path.abspath(out_dir)


def _source_config(workdir: str) -> dict | None:
    if not storage.is_remote(workdir):
        return legacy.read_source_config(workdir)
    path = storage.path(workdir) / legacy.SOURCE_CONFIG
    return json.loads(path.read_text()) if path.exists() else None


def _check_remote_out(out_dir: str, overwrite: bool, marker: str) -> None:
    storage.check_reachable(out_dir, field="out")
    if not overwrite and (storage.path(out_dir) / marker).exists():
        raise FileExistsError(f"out={out_dir!r} already holds {marker} (pass overwrite=True / --overwrite)")


@contextlib.contextmanager
def _out_folder(out_dir: str, overwrite: bool):
    """A temp folder that becomes `out_dir`: renamed locally, uploaded to gs:// (config.json last)."""
    if storage.is_remote(out_dir):
        _check_remote_out(out_dir, overwrite, "config.json")
        with storage.local_folder(out_dir) as tmp:
            yield tmp
    else:
        with hf.AtomicDir(out_dir, overwrite=overwrite) as tmp:
            yield tmp


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
    storage.path(out_dir, field="out")
    ref = ckpt.resolve(checkpoint, step)
    cfg = ckpt.load_config(ref)
    first_layout = legacy.is_first_layout(cfg)
    hf_cfg = None if first_layout else hf.config_to_hf(cfg, dtype)
    params = ckpt.load_params(ref, ckpt.params_of(model_lib.abstract_model(cfg)))
    state = {k: np.asarray(v).astype(np_dtype) for k, v in hf.params_to_hf(params).items()}
    with _out_folder(out_dir, overwrite) as tmp:
        if first_layout:  # our own remote code: transformers 5's Doge cannot hold this layout
            options = {hf.OPTION_PREFIX + name: getattr(cfg, name) for name in hf.JAX_ONLY_FIELDS}
            legacy.write_export_files(tmp, legacy.export_config(
                cfg, dtype, _source_config(ref.workdir), hf.HF_TO_JAX_FIELDS, options))
        else:
            hf_cfg.save_pretrained(tmp)
        has_tok = ref.tokenizer_dir is not None and storage.with_local_dir(
            ref.tokenizer_dir, lambda d: hf.copy_tokenizer_files(d, tmp))
        _generation_config(cfg, tmp if has_tok else None).save_pretrained(tmp)
        hf.write_safetensors(state, tmp, max_bytes)
        _model_card(tmp, cfg, ref, dtype, has_tok, push_to_hub)
        if push_to_hub and storage.is_remote(out_dir):
            upload(tmp, push_to_hub, api=hub_api, private=private)
    if push_to_hub and not storage.is_remote(out_dir):
        upload(out_dir, push_to_hub, api=hub_api, private=private)
    return str(storage.path(out_dir))


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


def end_token_ids(cfg, tokenizer_dir: str | None) -> list[int]:
    """Every token that ends generation: the model's EOS and each special token the chat template closes a
    turn with (`<|im_end|>` for the Doge template), so plain `model.generate` stops at the end of a turn. Read
    from the tokenizer files (tokenizer.json's special tokens, the template in chat_template.jinja or
    tokenizer_config.json)."""
    ids = [cfg.eos_token_id] if cfg.eos_token_id is not None else []
    if tokenizer_dir is None:
        return ids

    def read_json(name):
        path = os.path.join(tokenizer_dir, name)
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    template = read_json("tokenizer_config.json").get("chat_template") or ""
    jinja = os.path.join(tokenizer_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    template = template if isinstance(template, str) else json.dumps(template)  # named templates: a list
    for token in read_json("tokenizer.json").get("added_tokens", []):
        ends_turn = token["content"].endswith(("_end|>", "end_of_turn>", "|eot_id|>", "|endoftext|>"))
        if token.get("special") and ends_turn and token["content"] in template and token["id"] not in ids:
            ids.append(token["id"])
    return ids


def _generation_config(cfg, tokenizer_dir: str | None = None):
    from transformers import GenerationConfig

    ends = end_token_ids(cfg, tokenizer_dir)
    return GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=ends[0] if len(ends) == 1 else ends or None,
                            pad_token_id=cfg.pad_token_id, max_length=cfg.max_position_embeddings)


def _model_card(out: str, cfg, ref, dtype: str, has_tokenizer: bool, repo_id: str | None) -> None:
    n = model_lib.count_params(cfg)
    name = repo_id or storage.path(ref.workdir).name
    if legacy.is_first_layout(cfg):
        about = (f"in the first published SmallDoge layout (no q/k norm, one dynamic-mask bias per attention head), "
                 f"exported by doge-jax at step {ref.step} in {dtype}. transformers' native Doge cannot hold this "
                 f"layout: the folder ships its own `modeling_doge_legacy.py` (built on transformers' Doge classes), "
                 f"loaded with `trust_remote_code=True`.")
        load = f"model = AutoModelForCausalLM.from_pretrained({name!r}, trust_remote_code=True)"
    else:
        about = (f"trained with doge-jax and exported at step {ref.step} in {dtype}. It loads with transformers' "
                 f"native `DogeForCausalLM` (no `trust_remote_code`).")
        load = f"model = AutoModelForCausalLM.from_pretrained({name!r})"
    meta = ["library_name: transformers", "pipeline_tag: text-generation", "tags: [doge, doge-jax]"]
    evals = eval_results.read_card_entries(ref.workdir)  # written by `python -m doge_jax.eval` / training
    if evals:
        meta.append("model-index: " + json.dumps(eval_results.model_index(evals, name)))  # JSON is YAML too
    lines = [
        "---", *meta, "---", f"# {name}", "", f"A Doge causal language model ({n / 1e6:.1f}M parameters) {about}",
        "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", load,
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
