"""Bad config values fail early with one line naming the field; the entry point prints it and exits 2."""

import subprocess
import sys

import pytest

import train_harness as th
from doge_jax.trainer import ConfigError, Trainer

BAD = [
    ({"model__num_attention_heads": 3}, r"^config\.model\.num_attention_heads=3 must be a multiple of num_key_value_heads=2"),
    ({"mesh__fsdp": 3}, r"^config\.mesh\.fsdp=3 does not divide 1 devices$"),
    ({"mesh__data": 2, "mesh__fsdp": -1, "mesh__tensor": -1}, r"^config\.mesh\.tensor=-1: only one axis may be -1"),
    ({"seq_len": 128}, r"^config\.seq_len=128 exceeds config\.model\.max_position_embeddings=64$"),
    ({"data__path": ""}, r"^config\.data\.path='' must name files"),
    ({"data__path": "/nonexistent/*.txt"}, r"^config\.data\.path='/nonexistent/\*\.txt' matched no files$"),
    ({"grad_accum_steps": 3}, r"^config\.batch_size=8 is not divisible by config\.grad_accum_steps=3$"),
    ({"schedule__warmup_steps": 5, "schedule__decay_steps": 2}, r"^config\.schedule\.warmup_steps=5 \+ decay steps 2 exceed config\.total_steps=6$"),
    ({"schedule__decay_type": "exp"}, r"^config\.schedule\.decay_type='exp' must be one of"),
    ({"optimizer__lr": 0.0}, r"^config\.optimizer\.lr=0\.0 must be in \(0\.0, 1\.0\]$"),
    ({"model__vocab_size": 100}, r"^config\.model\.vocab_size=100 is smaller than the 8192 tokens"),
    ({"init_from": "/nonexistent/run"}, r"^config\.init_from: checkpoint='/nonexistent/run' does not exist$"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[next(iter(o)) for o, _ in BAD])
def test_bad_config_names_the_field(tmp_path, overrides, message):
    corpus = th.write_corpus(str(tmp_path / "c.txt"), paragraphs=20)
    with pytest.raises(ConfigError, match=message) as e:
        Trainer(th.tiny_config(corpus, **overrides), str(tmp_path / "run")).run()
    assert "\n" not in str(e.value)


def test_batch_not_divisible_by_data_parallel_devices(tmp_path):
    """Needs several devices: checked through the validation function the Trainer calls."""
    from doge_jax.trainer import validate

    config = th.tiny_config("unused", batch_size=12, grad_accum_steps=2)
    with pytest.raises(ConfigError, match=r"^config\.batch_size=12 / config\.grad_accum_steps=2 = 6 rows per "
                                          r"micro-batch, not divisible by the 4 data-parallel devices"):
        validate.check_parallelism(config, data_parallel=4, data_shards=1)


def test_entry_point_prints_one_line_and_exits_2(tmp_path):
    corpus = th.write_corpus(str(tmp_path / "c.txt"), paragraphs=20)
    proc = subprocess.run([sys.executable] + th.cli_args(corpus, str(tmp_path / "run"), mesh__fsdp=3),
                          cwd=th.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: config.mesh.fsdp=3 does not divide 1 devices"], proc.stderr


@pytest.mark.parametrize("preset", ["doge_tiny", "doge_20m", "doge_60m", "doge_160m", "doge_320m", "doge_40m_moe"])
def test_every_shipped_config_validates(preset):
    import importlib

    from doge_jax.trainer import validate

    config = importlib.import_module(f"configs.{preset}").get_config()
    validate.check(config, validate.model_config(config.model))
