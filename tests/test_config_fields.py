"""DogeConfig's field metadata is the one source: the presets' base, the converter's maps and the trainer's
runtime fields all derive from it. `moe_impl` (added with one `_field(...)` line) is the worked example."""

import dataclasses
import importlib

import pytest

from convert import hf as hf_lib
from doge_jax.model import config as config_lib
from doge_jax.model import options
from doge_jax.model.config import DogeConfig
from doge_jax.trainer import validate


def test_base_config_has_every_field_with_its_default():
    base = importlib.import_module("configs.base").model_defaults().to_dict()
    assert set(base) == {f.name for f in dataclasses.fields(DogeConfig)}
    for f in dataclasses.fields(DogeConfig):
        assert base[f.name] == f.default, f.name
    assert base["moe_impl"] == "auto" and base["attention_impl"] == "auto"


def test_converter_and_validation_read_the_metadata():
    assert "moe_impl" in validate.RUNTIME_FIELDS and "attention_impl" in validate.RUNTIME_FIELDS
    assert "vocab_size" not in validate.RUNTIME_FIELDS
    assert "moe_impl" not in hf_lib.HF_TO_JAX_FIELDS and "moe_impl" not in hf_lib.JAX_ONLY_FIELDS
    assert set(hf_lib.JAX_ONLY_FIELDS) == {"qk_norm", "dt_heads", "router_layout", "router_z_loss_coef"}
    assert hf_lib.ROPE_FIELDS == {"rope_theta": "rope_theta", "rope_type": "rope_type", "factor": "rope_factor"}
    exported = set(hf_lib.HF_TO_JAX_FIELDS) | set(hf_lib.ROPE_FIELDS.values()) | set(hf_lib.JAX_ONLY_FIELDS)
    assert exported | {"head_dim"} == {f.name for f in config_lib.fields(hf=True)}
    hf = hf_lib.config_to_hf(DogeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        moe_impl="reference"))
    assert not hasattr(hf, "moe_impl") and not hasattr(hf, "doge_jax_moe_impl")


def test_choices_come_from_the_implementation_tables():
    assert config_lib.fields()[0].name == "vocab_size"
    by_name = {f.name: f.metadata["choices"] for f in dataclasses.fields(DogeConfig)}
    assert by_name["hidden_act"] == tuple(options.ACTIVATIONS)
    assert by_name["remat_policy"] == tuple(options.REMAT_POLICIES)
    assert by_name["moe_impl"] == options.MOE_IMPLS
    with pytest.raises(config_lib.ConfigFieldError, match=r"^moe_impl='dense' must be one of") as e:
        DogeConfig(moe_impl="dense")
    assert e.value.field == "moe_impl"


def test_trainer_errors_carry_the_field_path():
    with pytest.raises(validate.ConfigError, match=r"^config\.model\.num_attention_heads=6 must be a multiple") as e:
        validate.model_config({"num_attention_heads": 6, "num_key_value_heads": 4})
    assert e.value.field == "model.num_attention_heads"
