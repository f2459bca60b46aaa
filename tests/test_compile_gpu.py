"""The GPU entry's Triton kernels compile for sm_90 (an H100/H200) on a CPU host without spilling registers and
within a block's shared memory, at the tiles the dispatcher chooses for head dim 128 (every preset's).

Runs benchmarks/gpu_compile_table.py in a subprocess: `dma_pallas_gpu` forward + vjp lowered for cuda, each
Triton module compiled by the triton wheel for GPUTarget("cuda", 90, 32) and assembled by its ptxas
(-v --gpu-name=sm_90a). Cases: bf16 with the top-k on the dense walk (T = 512, window 384) and the sparse walk
(T = 1024, window 256), and one bias per query head with R = 4 and left padding (the legacy checkpoint layout).
Checks: every kernel (forward, dQ, dK/dV) compiles, spills at most what its table entry accepts (the head-128
tiles were timed fastest on an H200 with a few spills: `gpu_tiles.Tiles.spills_measured`) and asks for at most
227 KB of shared memory; the same tiles forced through an override (no acceptance) are reported as failing, so the
detector is read, not assumed; float32 compiles and is reported apart (not a default path).
Needs the triton wheel (compat.TRITON_FOR_JAX): .ci/run runs this file in its Python 3.12 / 3.13 venvs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LIMIT = 227 * 1024

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed; .ci/run's extra venvs run it")


def _table(tmp_path, *args) -> list[dict]:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "gpu_compile_table.py"), "--heads", "128",
           "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())["rows"], proc.returncode


@pytest.mark.slow
def test_head_dim_128_kernels_compile_for_sm90_without_spills(tmp_path):
    from doge_jax.kernels import gpu_tiles

    rows, rc = _table(tmp_path, "--cases", "bf16-topk,bf16-padding-R4-bias/head,f32-topk")
    compiled = [r for r in rows if r["status"] not in ("refused", "fp32")]
    assert sorted((r["walk"], r["case"], r["kernel"]) for r in compiled) == sorted(  # module order varies
        (walk, case, kernel) for walk, case in [("dense", "bf16-topk"), ("sparse", "bf16-topk"),
                                                ("sparse", "bf16-padding-R4-bias/head")]
        for kernel in ("dma_forward", "dma_backward_dq", "dma_backward_dkv"))
    for r in compiled:
        # The head-128 entries were timed fastest on an H200 with a few spills: exactly those bytes are accepted.
        accepted = gpu_tiles.TABLE[128, r["walk"]].spills_measured
        assert r["status"] == "ok", r
        assert max(r["spill_stores"], r["spill_loads"]) <= accepted and 0 < r["registers"] <= 255, r
        assert 0 < r["shared_bytes"] <= SHARED_LIMIT, r
    # float32 compiles (correct, slow: attention_impl="auto" takes the XLA reference for it on a GPU).
    assert {r["status"] for r in rows if r["case"] == "f32-topk"} == {"fp32"}, rows
    assert rc == 0


@pytest.mark.slow
def test_a_spilling_tile_fails_the_check(tmp_path):
    rows, rc = _table(tmp_path, "--walks", "sparse", "--cases", "bf16-topk", "--warps", "4")
    assert rc == 1, rows
    forward = next(r for r in rows if r["kernel"] == "dma_forward")
    assert forward["num_warps"] == 4 and forward["status"] == "fail" and forward["spill_stores"] > 0, forward
    assert forward["message"].startswith("spills "), forward
