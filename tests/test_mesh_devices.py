"""The same run on 1 device and on 8 (fake CPU) devices in several mesh shapes gives the same losses, and a
checkpoint written on one mesh resumes on another. Runs in a subprocess: the device count must be set
before jax is imported, and this pytest process has imported it already."""

import json
import os
import subprocess
import sys

import numpy as np

import train_harness as th


def test_losses_agree_across_meshes(tmp_path):
    out = tmp_path / "losses.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run([sys.executable, os.path.join(th.REPO, "tests", "train_harness.py"), "meshes", str(out)],
                          cwd=th.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    reference = np.asarray([loss for _, loss in results.pop("1 device")])
    assert len(reference) == 4 and reference[-1] < reference[0]
    results.pop("moved-first")
    assert set(results) == {" ".join(f"{a}={s}" for a, s in m.items()) for m in th.MESHES} | {"moved"}
    for name, losses in results.items():
        assert [s for s, _ in losses] == [1, 2, 3, 4], name
        # fp32: the same sums split over devices and added in another order.
        np.testing.assert_allclose([loss for _, loss in losses], reference, rtol=2e-6, err_msg=name)


def test_moe_trains_expert_parallel_through_the_trainer(tmp_path):
    out = tmp_path / "moe.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, os.path.join(th.REPO, "tests", "train_harness.py"), "moe", str(out)],
                          cwd=th.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    single, sharded = results["1 device"], results["data=2 expert=4"]
    assert [r["step"] for r in sharded] == [r["step"] for r in single] and len(single) == 3
    np.testing.assert_allclose([r["loss"] for r in sharded], [r["loss"] for r in single], rtol=5e-6)
    for r in sharded:  # routing statistics reach the metrics
        assert 0 < r["moe/experts_used"] <= 1 and r["moe/load_max"] >= r["moe/load_mean"] > 0, r
        assert r["aux_loss"] > 0 and r["router_z_loss"] > 0
