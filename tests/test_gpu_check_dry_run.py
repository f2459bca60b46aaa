"""benchmarks/gpu_check_dma.py --dry-run: the GPU check script runs end to end on CPU (tiny shapes, kernels in
interpret mode), so the first lent GPU spends its minutes measuring, not debugging the script.

It checks the script, not the numbers: every section has its rows, the kernel passes its correctness cases
against the reference (the same tolerances as on a GPU), and the JSON and markdown reports are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check_dma.py"), "--out",
                           str(tmp_path), "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check_dma.json").read_text())
    assert report["dry_run"] is True
    assert len(report["correctness"]) == 2 and all(r["ok"] for r in report["correctness"]), report["correctness"]
    assert {r["impl"] for r in report["kernel_time"]} == {"pallas", "xla"}  # cuDNN only on a GPU
    assert all("fwd_ms" in r and "fwd+bwd_ms" in r for r in report["kernel_time"]), report["kernel_time"]
    train = report["train"]
    assert [(r["preset"], r["attention_impl"]) for r in train] == [
        ("doge_20m", "auto"), ("doge_20m", "xla"), ("doge_40m_moe", "auto"), ("doge_40m_moe", "xla")]
    for r in train:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu_measured"] and r["step_temp_gib"] >= 0, r
    assert [r["ran"] for r in train][::2] == ["pallas_gpu", "pallas_gpu"]  # the kernel path ran (interpret)
    assert [(r["preset"], r["batch"]) for r in report["decode"]] == [("doge_20m", 1), ("doge_20m", 16)]
    assert all(r["decode_tok_s"] > 0 for r in report["decode"]), report["decode"]
    tiles = report["tiles"]  # the tile sweep ran every tile of the dry list, each through the kernel
    assert [(r["rows"], r["block_k"]) for r in tiles] == [(16, 16), (32, 16)], tiles
    assert all(r["fwd_ms"] > 0 and r["fwd+bwd_ms"] > 0 for r in tiles), tiles
    assert [p["what"].split()[0] for p in report["profile"]] == ["doge_20m", "doge_40m_moe"]  # auto rows profiled
    md = (tmp_path / "gpu_check_dma.md").read_text()
    assert "DRY RUN" in md and "## 4. decode" in md and "## 5. kernel tiles" in md
