"""The one place that chooses the attention implementation (doge_jax.model.attention_impl).

A named kernel runs or raises a one-line error saying why; only "auto" falls back, and it logs which
implementation each layer got and why.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import doge_jax
from doge_jax.model import attention_impl
from doge_jax.model.mask import MaskSpec

CFG = doge_jax.DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          keep_window_size=8)


def _qkd(T=12, S=12):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (1, T, 4, 16)), jax.random.normal(ks[1], (1, S, 2, 16)),
            jax.random.normal(ks[2], (1, 2, S)))


def _ids():
    return jnp.asarray(np.random.default_rng(0).permutation(64)[:20].reshape(2, 10), jnp.int32)


def test_named_kernel_with_dropout_raises_one_line():
    model = doge_jax.build(CFG.replace(attention_dropout=0.1, attention_impl="pallas_gpu"))
    model.train()
    with pytest.raises(ValueError) as e:
        model(_ids())
    msg = str(e.value).splitlines()[0]
    assert msg.startswith("attention_impl='pallas_gpu' cannot run attention dropout 0.1"), msg
    assert "use 'auto'" in msg


def test_pallas_names_the_backend_kernel_and_cpu_has_none():
    q, k, dt = _qkd()
    with pytest.raises(ValueError, match=r"attention_impl='pallas' has no kernel for backend 'cpu'"):
        attention_impl.choose("pallas", q, k, dt, MaskSpec(keep_window_size=8), backend="cpu")
    assert attention_impl.choose("pallas", q, k, dt, MaskSpec(keep_window_size=8), backend="gpu").impl == "pallas_gpu"
    assert attention_impl.choose("pallas", q, k, dt, MaskSpec(keep_window_size=8), backend="tpu").impl == "pallas_tpu"


def test_auto_falls_back_with_the_reason():
    q, k, dt = _qkd()
    mask = MaskSpec(keep_window_size=8)
    assert attention_impl.choose("auto", q, k, dt, mask, backend="cpu") == attention_impl.Choice(
        "xla", "no DMA kernel for backend 'cpu'")
    got = attention_impl.choose("auto", q, k, dt, mask, dropout_rate=0.1, backend="gpu")
    assert got.impl == "xla" and got.reason.startswith("pallas_gpu cannot run attention dropout 0.1")
    decoding = mask.replace(q_offset=jnp.array([3]))  # per-batch cache offset
    got = attention_impl.choose("auto", q[:, :1], k, dt, decoding, backend="gpu")
    assert got.impl == "xla" and "q_offset" in got.reason
    with pytest.raises(ValueError, match=r"^attention_impl='pallas_gpu' cannot run a traced or per-batch q_offset"):
        attention_impl.choose("pallas_gpu", q[:, :1], k, dt, decoding, backend="gpu")


def test_auto_takes_the_reference_for_float32_on_a_gpu_and_a_named_kernel_still_runs_it():
    """The fp32 kernel spills tens of KB of registers per thread on sm_90 (benchmarks/gpu_compile_table.py):
    "auto" takes the XLA reference for it, with the reason; bf16 gets the kernel; naming the kernel keeps it."""
    q, k, dt = _qkd()
    mask = MaskSpec(keep_window_size=8)
    got = attention_impl.choose("auto", q, k, dt, mask, backend="gpu")
    assert got.impl == "xla" and got.reason.startswith("pallas_gpu cannot run float32 q/k/v on a GPU"), got
    bf16 = attention_impl.choose("auto", q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), dt, mask, backend="gpu")
    assert bf16.impl == "pallas_gpu"
    assert attention_impl.choose("pallas_gpu", q, k, dt, mask, backend="gpu").impl == "pallas_gpu"
    assert attention_impl.choose("auto", q, k, dt, mask, backend="tpu").impl == "pallas_tpu"  # TPU: no such limit


def test_auto_logs_each_layer_once(caplog):
    attention_impl._LOGGED.clear()
    model = doge_jax.build(CFG.replace(attention_impl="auto"))
    with caplog.at_level(logging.INFO, logger="absl"):
        model(_ids())
        model(_ids())  # a second call logs nothing new
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DMA layer")]
    assert lines == [f"DMA layer {i}: attention_impl='auto' runs xla (no DMA kernel for backend 'cpu')"
                     for i in range(CFG.num_hidden_layers)]


def test_a_mesh_whose_tensor_axis_splits_kv_heads():
    """3 kv heads on tensor=2 (doge_160m's shape): a named kernel says so in one line, "auto" takes the reference."""
    q, k, dt = jax.random.normal(jax.random.key(0), (2, 8, 6, 16)), jnp.ones((2, 8, 3, 16)), jnp.ones((2, 3, 8))
    mesh = jax.sharding.AbstractMesh((1, 1, 2, 1), ("data", "fsdp", "tensor", "expert"))
    mask = MaskSpec(keep_window_size=8)
    got = attention_impl.choose("auto", q, k, dt, mask, backend="gpu", mesh=mesh)
    assert got.impl == "xla" and "tensor=2 does not divide num_key_value_heads=3" in got.reason
    with pytest.raises(ValueError, match=r"^attention_impl='pallas_gpu' cannot run mesh axis tensor=2 does not "
                                         r"divide num_key_value_heads=3"):
        attention_impl.choose("pallas_gpu", q, k, dt, mask, backend="gpu", mesh=mesh)
