"""The first published SmallDoge layout, both ways: reading the Hub folders, writing a folder transformers 5 loads.

Doge-60M/160M/320M and their -Instruct models (SmallDoge on the Hub) predate transformers' native Doge: no q/k
RMSNorm, `A` / `dt_proj` sized by the attention heads (doge-jax: `qk_norm=False, dt_heads="attention"`). Their
folders exist in two generations, both read here:

- original (small-doge `src/small_doge/models/modeling_doge.py` up to April 2025): `model.word_embed`,
  `model.layers.i.pre_layernorm` / `pre_residual.weight` / `post_layernorm` / `post_residual.weight`,
  `...feed_forward.*`, `model.final_layernorm`; config.json with `hidden_bias`, `dynamic_mask_ratio`,
  `rope_theta` + `rope_scaling`, `auto_map` to their own `configuration_doge` / `modeling_doge`;
- renamed (August 2025, SmallDoge's `convert_doge_weights_to_hf.py` and the Hub repos since): transformers'
  names (`model.embed_tokens`, `input_layernorm`, `input_residual`, `post_attention_layernorm`,
  `post_attention_residual`, `mlp.*`, `model.norm`), still without q/k norm and with `A` per attention head.

Their remote code does not import under transformers 5, and neither is needed here: only config.json and the
weights are read. Exports use transformers' names (the second generation) and ship this project's own
`configuration_doge_legacy.py` / `modeling_doge_legacy.py` beside them, registered through `auto_map`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from typing import Any

import numpy as np

# First-generation weight names → transformers' names: the table of SmallDoge's own converter
# (small-doge `src/small_doge/models/doge/convert_doge_weights_to_hf.py`, August 2025), anchored both ends, plus
# the bias keys a `hidden_bias: true` model would carry. Their `feed_forward.router_gate.bias`, which that
# converter drops, is refused instead: dropping a weight would change the model.
FIRST_GENERATION_NAMES = (
    (r"model\.word_embed\.weight", r"model.embed_tokens.weight"),
    (r"model\.final_layernorm\.weight", r"model.norm.weight"),
    (r"model\.layers\.(\d+)\.pre_layernorm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"model\.layers\.(\d+)\.pre_residual\.weight", r"model.layers.\1.input_residual"),
    (r"model\.layers\.(\d+)\.post_layernorm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"model\.layers\.(\d+)\.post_residual\.weight", r"model.layers.\1.post_attention_residual"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj|dt_proj)\.(weight|bias)",
     r"model.layers.\1.self_attn.\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.A", r"model.layers.\1.self_attn.A"),
    (r"model\.layers\.(\d+)\.feed_forward\.(gate_proj|up_proj|down_proj)\.(weight|bias)",
     r"model.layers.\1.mlp.\2.\3"),
    (r"model\.layers\.(\d+)\.feed_forward\.(router_gate|down_embed|up_embed)\.weight",
     r"model.layers.\1.mlp.\2.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
)
FIRST_GENERATION_MARKERS = ("model.word_embed.weight", "model.final_layernorm.weight")

# Written with every export of this layout; the files sit next to this module.
REMOTE_CODE = ("configuration_doge_legacy.py", "modeling_doge_legacy.py")
AUTO_MAP = {
    "AutoConfig": "configuration_doge_legacy.DogeLegacyConfig",
    "AutoModel": "modeling_doge_legacy.DogeLegacyModel",
    "AutoModelForCausalLM": "modeling_doge_legacy.DogeLegacyForCausalLM",
}
ARCHITECTURE = "DogeLegacyForCausalLM"
# The source's config.json, kept verbatim in the doge-jax workdir so `to-hf` writes every published field back.
SOURCE_CONFIG = "hf_source_config.json"
# Keys an export sets itself: they name the code, the file's dtype and the writer, not the model.
EXPORT_OWNED = ("auto_map", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
                "rope_parameters")


# --- reading ----------------------------------------------------------------------------------------------------

def rename_first_generation(state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The original Hub weight names → transformers' names; other checkpoints pass through unchanged."""
    if not any(k in state for k in FIRST_GENERATION_MARKERS):
        return state
    out = {}
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq") or key.startswith("model.rotary_emb."):
            continue  # RoPE buffers some saves include; recomputed from the config
        for pattern, replacement in FIRST_GENERATION_NAMES:
            new, n = re.subn(f"^{pattern}$", replacement, key)
            if n:
                out[new] = value
                break
        else:
            raise ValueError(f"{source}: weight {key!r} of the original SmallDoge layout has no counterpart in "
                             f"transformers' Doge (known: embeddings, norms, residuals, attention, MLP, CDMoE "
                             f"router/experts, lm_head)")
    return out


def normalize_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Published config.json keys transformers 5's DogeConfig does not read, turned into the ones it does."""
    ratio = raw.get("dynamic_mask_ratio", 0.0)
    if ratio not in (0, 0.0, None):
        raise ValueError(f"{source}: dynamic_mask_ratio={ratio} is not supported (only 0.0, the default every "
                         f"published SmallDoge model uses: no kthvalue masking beyond keep_window_size)")
    if raw.get("is_moe") and any(k in raw for k in ("num_cdmoe_experts", "num_cdmoe_heads")):
        raise ValueError(f"{source}: is_moe=True with num_cdmoe_experts/num_cdmoe_heads is SmallDoge's first CDMoE "
                         f"(multi-head expert retrieval), which transformers' Doge and doge-jax do not implement")
    out = copy.deepcopy(raw)  # transformers' config standardises nested dicts in place; the source stays as read
    if "hidden_bias" in raw:
        # The original code's one switch for every linear layer's bias (dt_proj included).
        out.setdefault("attention_bias", bool(raw["hidden_bias"]))
        out.setdefault("mlp_bias", bool(raw["hidden_bias"]))
    return out


def is_first_layout(cfg) -> bool:
    """No q/k norm and one dt bias per attention head (per kv head is the same thing when the counts are equal)."""
    return not cfg.qk_norm and (cfg.dt_heads == "attention" or cfg.num_key_value_heads == cfg.num_attention_heads)


def keep_source_config(workdir: str, raw: dict[str, Any]) -> None:
    with open(os.path.join(workdir, SOURCE_CONFIG), "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)


# --- writing ----------------------------------------------------------------------------------------------------

def _rope_scaling(cfg) -> dict[str, Any] | None:
    if cfg.rope_type == "default":
        return None
    # No original_max_position_embeddings: transformers 5's dynamic NTK takes only the factor and scales from
    # max_position_embeddings, as doge-jax does (a published file's own key, equal to it, is kept as written).
    return {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}


def _same_rope(published: Any, cfg) -> bool:
    """Whether a published `rope_scaling` means what cfg computes (its `type` spelling and extra keys kept)."""
    if not published:
        return cfg.rope_type == "default"
    kind = published.get("rope_type", published.get("type", "default"))
    original = published.get("original_max_position_embeddings", cfg.max_position_embeddings)
    return (kind == cfg.rope_type and float(published.get("factor", 1.0)) == cfg.rope_factor
            and (kind != "dynamic" or original == cfg.max_position_embeddings))


def export_config(cfg, dtype: str, source: dict[str, Any] | None, model_fields: tuple[str, ...],
                  options: dict[str, Any]) -> dict[str, Any]:
    """config.json for a first-layout export: the source's keys, with every field the model defines from cfg.

    `model_fields` are the transformers field names that mirror cfg one to one; `options` the doge-jax keys
    (prefixed) the dense export writes too."""
    import transformers

    out = {k: v for k, v in (source or {}).items() if k not in EXPORT_OWNED}
    out.update({name: getattr(cfg, name) for name in model_fields})
    out.update(options)
    out["model_type"] = "doge"
    out["rope_theta"] = cfg.rope_theta
    if not _same_rope(out.get("rope_scaling"), cfg):
        out["rope_scaling"] = _rope_scaling(cfg)
    out.setdefault("rope_scaling", None)
    if "head_dim" in out or cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        out["head_dim"] = cfg.head_dim
    if "hidden_bias" in out:
        if cfg.attention_bias == cfg.mlp_bias:
            out["hidden_bias"] = cfg.attention_bias
        else:
            del out["hidden_bias"]  # one switch cannot say it; attention_bias / mlp_bias do
    out["dynamic_mask_ratio"] = 0.0
    if "torch_dtype" in (source or {}):
        out["torch_dtype"] = dtype
    out.update(architectures=[ARCHITECTURE], auto_map=dict(AUTO_MAP), dtype=dtype,
               transformers_version=transformers.__version__)
    return dict(sorted(out.items()))


def write_export_files(out_dir: str, config: dict[str, Any]) -> None:
    """config.json plus the two remote-code files `auto_map` names."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in REMOTE_CODE:
        shutil.copy2(os.path.join(here, name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def read_source_config(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, SOURCE_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
