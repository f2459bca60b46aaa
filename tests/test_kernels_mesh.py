"""Every DMA kernel inside shard_map on a device mesh: the same outputs, gradients and model loss as the XLA
reference on one device, on 1, 2, 4 and 8 fake CPU devices (data, fsdp, tensor, expert and mixed meshes), and
the one-line error when the tensor axis does not divide the kv heads.

The checks need fake devices, which must be requested before jax is imported, and pytest has imported jax
already: they run in a subprocess (tests/kernels_mesh_check.py, which writes its tolerances out). The Triton
kernel runs in interpret mode here. The Mosaic TPU kernel's interpret mode does not return inside shard_map over
several CPU devices (jax 0.10), so the dispatcher refuses that combination in one line (tested below); its
per-shard form is checked by lowering for "tpu" (tests/test_lowering.py) and on one device in interpret mode
(tests/test_kernels_tpu.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from doge_jax.kernels import target
from doge_jax.model import attention_impl
from doge_jax.model.mask import MaskSpec

HERE = os.path.dirname(os.path.abspath(__file__))


def test_tpu_interpret_mode_refuses_a_multi_device_mesh():
    """TPU interpret mode (jax 0.10) never returns inside shard_map over several CPU devices, so off a TPU the
    dispatcher refuses pallas_tpu on such a mesh in one line instead of hanging; on a TPU (or lowering for one)
    the real kernel runs per shard, which tests/test_lowering.py checks."""
    q, k, dt = jnp.zeros((4, 24, 8, 64)), jnp.zeros((4, 24, 4, 64)), jnp.ones((4, 4, 24))
    mesh = jax.sharding.AbstractMesh((2, 1, 1, 1), ("data", "fsdp", "tensor", "expert"))
    mask = MaskSpec(keep_window_size=8)
    with pytest.raises(ValueError, match=r"^attention_impl='pallas_tpu' cannot run in TPU interpret mode on a "
                                         r"2-device mesh"):
        attention_impl.choose("pallas_tpu", q, k, dt, mask, backend="cpu", mesh=mesh)
    assert attention_impl.choose("pallas_tpu", q, k, dt, mask, backend="tpu", mesh=mesh).impl == "pallas_tpu"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_gpu"])
def test_kernel_on_meshes_matches_reference(impl):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "kernels_mesh_check.py"), impl],
                          cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[-1].endswith("ALL OK"), proc.stdout[-4000:]
    assert sum(" layer " in line for line in lines) == 8 and sum(" model " in line for line in lines) == 3
    assert any("does not divide num_key_value_heads=2" in line for line in lines)


def test_lowering_for_sets_the_kernel_backend_and_restores_it():
    q, k = jnp.zeros((1, 12, 4, 16), jnp.bfloat16), jnp.zeros((1, 12, 2, 16), jnp.bfloat16)  # GPU: not float32
    dt = jnp.ones((1, 2, 12))
    mask = MaskSpec(keep_window_size=8)
    assert target.backend() == jax.default_backend()
    with target.lowering_for("cuda"):
        assert target.backend() == "gpu"
        assert attention_impl.choose("pallas", q, k, dt, mask).impl == "pallas_gpu"
        with target.lowering_for("tpu"):
            assert target.backend() == "tpu"
        assert target.backend() == "gpu"
    assert target.backend() == jax.default_backend()


def test_lowering_for_unknown_platform_is_one_line():
    with pytest.raises(ValueError, match=r"^lowering_for\(platform='metal'\): must be one of \[") as e:
        with target.lowering_for("metal"):
            pass
    assert "\n" not in str(e.value)
