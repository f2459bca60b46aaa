"""benchmarks/step_cost.py, the per-step cost table of the compiled TPU program, as a dry run on this CPU.

The dry run compiles doge_20m (2 layers, T = 256) with XLA:CPU and costs it at v5e's figures; its FLOPs, bytes and
bound must add up the way the table says (the TPU rows run the same code on libtpu's program:
`python benchmarks/step_cost.py`), and the matmul FLOPs of the whole step must be the model's (6·P·tokens plus the
chunked loss recomputing the head in the backward pass: between 1.0 and 1.5 times).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

_ENV_BEFORE = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import step_cost  # noqa: E402

from doge_jax.model.config import DogeConfig  # noqa: E402
from doge_jax.trainer import flops  # noqa: E402


def test_importing_the_benchmarks_leaves_the_environment_alone():
    """pytest imports this file while collecting the whole suite: had step_cost (or compile_table / lowering_table
    under it) set XLA_FLAGS, every later subprocess (the CLI, notebooks, the chain) would see 8 fake devices."""
    import compile_table  # noqa: F401
    import lowering_table  # noqa: F401

    assert {k: os.environ.get(k) for k in _ENV_BEFORE} == _ENV_BEFORE


@pytest.mark.slow
def test_dry_run_table_adds_up(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert step_cost.main(["--dry-run", "--top", "4", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["status"] == "compiled" and row["layers"] == 2 and row["seq_len"] == 256
    peak, bw = step_cost.CHIPS["v5e"]
    assert row["flops"] == pytest.approx(row["matmul_flops"] + row["other_flops"] + row["kernel_flops"])
    assert row["bytes"] == pytest.approx(row["matmul_bytes"] + row["other_bytes"] + row["kernel_bytes"])
    # Ops one after another can never beat the whole step's roofline, and the bound is their sum.
    assert row["serial_s"] >= row["bound_s"] * (1 - 1e-9) > 0
    assert row["serial_s"] == pytest.approx(row["matmul_s"] + row["other_s"] + row["kernel_s"])
    assert row["bound_s"] == pytest.approx(max(row["flops"] / peak, row["bytes"] / bw))
    assert 0 < row["mfu_serial"] <= row["mfu_ceiling"] * (1 + 1e-9) <= 1 + 1e-9
    # The whole step's matmuls (every micro-batch and loss chunk counted) against 6·P·tokens.
    from lowering_table import preset_config

    config = preset_config("doge_20m", impl="xla", layers=2, remat="full", seq_len=256)
    model = DogeConfig.from_dict(config.model.to_dict())
    six_p_tokens = 6.0 * flops.matmul_params_per_token(model) * config.batch_size * config.seq_len
    assert 1.0 <= row["matmul_flops"] / six_p_tokens <= 1.5, row["matmul_flops"] / six_p_tokens
    top = row["top_other"]
    assert len(top) == 4 and [t["seconds"] for t in top] == sorted((t["seconds"] for t in top), reverse=True)
    assert sum(t["seconds"] for t in top) <= row["other_s"] * (1 + 1e-9)
    assert any(".py:" in t["source"] for t in top), top
    printed = capsys.readouterr().out
    assert "| doge_20m (2) |" in printed and "MFU ceiling" in printed
