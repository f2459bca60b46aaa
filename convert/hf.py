"""Doge weights between doge-jax (Orbax, NNX parameter names) and transformers (safetensors, config.json).

Our parameter paths mirror transformers' state dict; the mapping is mechanical:
    embed_tokens                      ↔ model.embed_tokens.weight
    lm_head.kernel                    ↔ lm_head.weight (transposed; absent when embeddings are tied)
    <path>.kernel                     ↔ model.<path>.weight (transposed: ours is [in, out])
    <path>.bias / .weight / A / ...   ↔ model.<path>.<same>
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from doge_jax.model import config as config_lib
from doge_jax.model.config import OPTION_PREFIX, DogeConfig

# The field maps, from DogeConfig's metadata (doge_jax/model/config.py is the one source):
# transformers attributes (DogeField → config.json key), keys inside rope_parameters, and doge-jax options that
# travel as `doge_jax_<name>`.
HF_TO_JAX_FIELDS = tuple(f.name for f in config_lib.fields() if f.metadata["hf"] == f.name and f.name != "head_dim")
ROPE_FIELDS = {f.metadata["hf"].split(".", 1)[1]: f.name for f in config_lib.fields()
               if str(f.metadata["hf"]).startswith("rope_parameters.")}  # rope_theta, rope_type, factor
JAX_ONLY_FIELDS = tuple(f.name for f in config_lib.fields() if f.metadata["hf"] == config_lib.OPTION)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


# --- config ---------------------------------------------------------------------------------------------------

def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> DogeConfig:
    """A transformers Doge config.json (any transformers version, or the SmallDoge originals) → DogeConfig.

    Goes through transformers' own `DogeConfig` so absent keys take transformers' defaults and old
    `rope_theta` + `rope_scaling: {"type": ...}` are standardised the way transformers reads them."""
    from transformers import DogeConfig as HFDogeConfig

    model_type = raw.get("model_type")
    if model_type != "doge":
        raise ValueError(f"{source}: model_type={model_type!r} is not a Doge model (expected 'doge')")
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "transformers_version")}
    hf = HFDogeConfig(**raw)
    if hasattr(hf, "standardize_rope_params"):
        hf.standardize_rope_params()
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    fields = {name: getattr(hf, name) for name in HF_TO_JAX_FIELDS if hasattr(hf, name)}
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope.setdefault("factor", 1.0)
    fields.update({ours: rope[key] for key, ours in ROPE_FIELDS.items()})
    fields["rope_theta"], fields["rope_factor"] = float(fields["rope_theta"]), float(fields["rope_factor"])
    head_dim = raw.get("head_dim")
    if head_dim:
        fields["head_dim"] = int(head_dim)
    for name in JAX_ONLY_FIELDS:
        if OPTION_PREFIX + name in raw:
            fields[name] = raw[OPTION_PREFIX + name]
    # Checkpoints from transformers route with its view(2, B*T, -1) layout: reproduce it unless told otherwise.
    fields.setdefault("router_layout", "transformers")
    try:
        return DogeConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def config_to_hf(cfg: DogeConfig, dtype: str = "float32"):
    """DogeConfig → transformers.DogeConfig (what `AutoConfig.from_pretrained` will read back)."""
    from transformers import DogeConfig as HFDogeConfig

    if not cfg.qk_norm or cfg.dt_heads != "kv":
        raise ValueError(f"qk_norm={cfg.qk_norm}, dt_heads={cfg.dt_heads!r}: neither transformers 5 Doge (q/k norm, "
                         f"dt per kv head) nor the first SmallDoge layout (no q/k norm, dt per attention head); "
                         f"no transformers model computes it")
    rope = {key: getattr(cfg, ours) for key, ours in ROPE_FIELDS.items()}
    if cfg.rope_type == "default":  # transformers' default rope takes no factor
        rope.pop("factor")
    fields = {name: getattr(cfg, name) for name in HF_TO_JAX_FIELDS}
    hf = HFDogeConfig(**fields, head_dim=cfg.head_dim, rope_parameters=rope)
    hf.architectures = ["DogeForCausalLM"]
    hf.dtype = dtype
    for name in JAX_ONLY_FIELDS:
        if name not in ("qk_norm", "dt_heads"):  # the layout options: only their transformers value is exported
            setattr(hf, OPTION_PREFIX + name, getattr(cfg, name))
    return hf


# --- weights --------------------------------------------------------------------------------------------------

def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in key.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def _jax_name_to_hf(name: str) -> tuple[str, bool]:
    """Our dotted path → (transformers key, whether to transpose)."""
    if name == "embed_tokens":
        return "model.embed_tokens.weight", False
    if name == "lm_head.kernel":
        return "lm_head.weight", True
    if name.endswith(".kernel"):
        return "model." + name[: -len(".kernel")] + ".weight", True
    if name.endswith((".down_embed", ".up_embed")):
        return "model." + name + ".weight", False
    return "model." + name, False


def params_to_hf(params: dict) -> dict[str, np.ndarray]:
    """Nested parameter dict → transformers state dict (numpy, same dtype)."""
    out = {}
    for name, value in _flatten(params).items():
        key, transpose = _jax_name_to_hf(name)
        value = np.asarray(value)
        out[key] = np.ascontiguousarray(value.T if transpose else value)
    return out


def params_from_hf(state: dict[str, np.ndarray], expected: dict, source: str = "checkpoint") -> dict:
    """transformers state dict → nested parameter dict shaped like `expected` (float32), checking every shape."""
    flat_expected = _flatten(expected)
    out = {}
    for name, ref in flat_expected.items():
        key, transpose = _jax_name_to_hf(name)
        if key not in state:
            raise ValueError(f"{source}: missing weight {key!r} (needed for {name})")
        value = np.asarray(state[key])
        value = value.T if transpose else value
        if tuple(value.shape) != tuple(ref.shape):
            shown = tuple(value.T.shape) if transpose else tuple(value.shape)
            want = tuple(ref.shape[::-1]) if transpose else tuple(ref.shape)
            raise ValueError(f"{source}: weight {key!r} has shape {shown}, the config implies {want}")
        out[name] = value.astype(np.float32)
    known = {_jax_name_to_hf(n)[0] for n in flat_expected}
    if "lm_head.weight" in state and "lm_head.weight" not in known:
        known.add("lm_head.weight")  # tied models may still carry the duplicate
    extra = sorted(k for k in state if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ValueError(f"{source}: unexpected weight(s) {extra[:5]}{' …' if len(extra) > 5 else ''} "
                         f"for this config")
    return _unflatten(out)


def detect_layout(state: dict[str, np.ndarray], cfg: DogeConfig) -> DogeConfig:
    """Older SmallDoge checkpoints: no q/k norm, `A` per attention head. Read it off the weights."""
    qk_norm = any(k.endswith("self_attn.q_norm.weight") for k in state)
    a = [v for k, v in state.items() if k.endswith("self_attn.A")]
    dt_heads = cfg.dt_heads
    if a and a[0].shape[0] == cfg.num_attention_heads != cfg.num_key_value_heads:
        dt_heads = "attention"
    return cfg.replace(qk_norm=qk_norm, dt_heads=dt_heads)


# --- files ----------------------------------------------------------------------------------------------------

def read_safetensors_dir(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        state = {}
        for name in files:
            state.update(load_file(os.path.join(path, name)))
        return state
    bins = sorted(f for f in os.listdir(path) if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", f))
    if bins:
        import torch  # Only the legacy .bin format needs torch.

        state = {}
        for name in bins:
            sd = torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
            state.update({k: v.float().numpy() for k, v in sd.items()})
        return state
    raise FileNotFoundError(f"{path}: no model.safetensors / pytorch_model.bin weights found")


def write_safetensors(state: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than max_shard_bytes."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.nbytes for v in state.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def copy_tokenizer_files(src: str, dst: str) -> bool:
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if not names:
        return False
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
    return True


class AtomicDir:
    """Write into a sibling temp folder; rename onto `path` only when everything succeeded."""

    def __init__(self, path: str, overwrite: bool = False):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.overwrite = overwrite

    def __enter__(self) -> str:
        if os.path.exists(self.path) and (not os.path.isdir(self.path) or os.listdir(self.path)) \
                and not self.overwrite:
            raise FileExistsError(f"out={self.path!r} already exists and is not empty (pass overwrite=True / "
                                  f"--overwrite to replace it)")
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)
        except OSError as e:
            raise PermissionError(f"out={self.path!r} is not writable: {e.strerror}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.path):
            old = self.tmp + ".old"
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.path)
        return False


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r} must look like '2GB', '500MB' or a byte count")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def param_bytes(state: dict[str, np.ndarray]) -> int:
    return sum(int(math.prod(v.shape)) * v.dtype.itemsize for v in state.values())
