"""Every shipped config loads and builds; dense preset parameter counts equal transformers' (no allocation)."""

from __future__ import annotations

import glob
import importlib
import os

import pytest
import torch

import doge_jax
from convert import hf as hf_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "base")))
PUBLISHED = {"doge_20m": 13.1e6, "doge_60m": 54e6, "doge_160m": 152e6, "doge_320m": 335e6}


def _model_config(name):
    return doge_jax.DogeConfig.from_dict(importlib.import_module(f"configs.{name}").get_config().model.to_dict())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds(name):
    cfg = _model_config(name)
    assert doge_jax.count_params(cfg) > 0  # jax.eval_shape: shapes only


@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["doge_40m_moe"])
def test_param_count_equals_transformers(name):
    from transformers import DogeForCausalLM

    cfg = _model_config(name)
    with torch.device("meta"):
        hf_model = DogeForCausalLM(hf_lib.config_to_hf(cfg))
    hf_count = sum(p.numel() for p in hf_model.parameters())
    ours = doge_jax.count_params(cfg)
    print(f"{name}: doge-jax {ours:,} transformers {hf_count:,}")
    assert ours == hf_count
    if name in PUBLISHED:
        assert abs(ours - PUBLISHED[name]) / PUBLISHED[name] < 0.02


def test_bad_model_config_names_the_field():
    with pytest.raises(ValueError, match="num_attention_heads=6 must be a multiple of num_key_value_heads=4"):
        doge_jax.DogeConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        doge_jax.DogeConfig(rope_type="yarn")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hiden_size'\]"):
        doge_jax.DogeConfig.from_dict({"hiden_size": 3})
