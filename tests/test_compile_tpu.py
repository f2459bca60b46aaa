"""The trainer's train step compiles for a real 8-chip TPU v5e slice (XLA:TPU and Mosaic from libtpu, no TPU
attached), with the Mosaic kernels inside, and the compiler's memory and cost figures are the step's.

Runs benchmarks/compile_table.py in a subprocess on two representative rows, one layer, T = 256, bf16, remat full,
attention_impl "pallas_tpu", 4 rows per data-parallel chip per micro-batch:
  doge_60m      on v5e:2x4 as fsdp=4 × tensor=2 (kv heads split over tensor, parameters over fsdp);
  doge_40m_moe  on v5e:2x4 as data=2 × expert=4 (CDMoE's expert-parallel lookup).
Checks: each compiles; per layer 2 forward kernels (the step's and remat's recompute), one dQ and one dK/dV;
the per-chip HBM peak is positive and under v5e's 16 GB; the whole step's FLOPs per chip, every loop counted as
often as it runs (benchmarks/hlo_cost.py), are within [1.0, 1.6] × 6 × the matmul parameters per token
(trainer/flops.py) × the step's tokens / 8 chips: the Mosaic kernels add nothing (no cost estimate); the
chunked loss's recompute of the LM head in the backward pass (+1/3 of the head's 6·P, the head being most of a
one-layer model), norms, the loss, the optimizer and work repeated across the tensor axis add the rest. The same
HLO counted with every loop body once must match compiled.cost_analysis() (within 10 %; measured 3 % dense, 6 % MoE), which is how XLA
counts: the evidence that hlo_cost's per-instruction rules are XLA's.
Needs libtpu (the jax[tpu] extra): .ci/run runs this file in its Python 3.12 / 3.13 venvs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, MICRO_ROWS = 256, 4
FLOPS_RATIO = (1.0, 1.6)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install 'jax[tpu]'); .ci/run's extra venvs run it")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "compile_table.py"), "--presets", "doge_60m,doge_40m_moe",
           "--rows", "v5e:2x4 fsdp=4,tensor=2;v5e:2x4 data=2,expert=4", "--impls", "pallas_tpu", "--layers", "1",
           "--seq", str(SEQ), "--micro-rows", str(MICRO_ROWS), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())["rows"]


@pytest.mark.slow
def test_train_step_compiles_for_v5e_with_mosaic_kernels(rows):
    assert [(r["preset"], r["mesh"]) for r in rows] == [("doge_60m", "fsdp=4,tensor=2"),
                                                         ("doge_40m_moe", "data=2,expert=4")]
    for r in rows:
        assert r["status"] == "compiled", r
        assert r["chips"] == 8 and r["device_kind"].startswith("TPU v5"), r
        assert r["kernel_calls"] == {"dma_tpu_forward": 2, "dma_tpu_backward_dq": 1, "dma_tpu_backward_dkv": 1}, r


@pytest.mark.slow
def test_memory_and_cost_are_the_compiled_steps(rows):
    for r in rows:
        assert 0 < r["temp_gb"] < r["peak_gb"] < 16, r
        assert r["grad_accum"] > 1, r  # the preset's batch in micro-batches, a loop cost_analysis counts once
        ratio = r["flops"] / r["matmul_flops_per_chip"]
        assert FLOPS_RATIO[0] <= ratio <= FLOPS_RATIO[1], (ratio, r)
        assert abs(r["flops_once"] / r["flops_xla"] - 1) < 0.1, r
        assert r["flops"] > 0.9 * r["grad_accum"] * r["flops_xla"], r
        assert r["bytes_accessed"] > 0, r
