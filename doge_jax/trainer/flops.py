"""Model FLOPs per token and MFU.

Training FLOPs per token = 3 × forward (the backward pass costs two forwards), forward = 2 × multiply-adds:

    forward = 2 · P_matmul                      every weight a token multiplies: q/k/v/o, dt_proj, the MLP,
                                                the LM head (the tied embedding counts once, as the head);
                                                a CDMoE layer counts its router, shared MLP and the
                                                top-k rank-1 experts it uses (2·k·D), not all E experts
            + L · 2 · 2 · N · H · S_eff         attention: q·kᵀ and probs·v for N heads over S_eff keys,
                                                S_eff = min(seq_len, keep_window_size) (DMA's kept keys)

Attention is counted over the whole key range (no causal halving), as in PaLM's appendix B; remat recompute
is not counted (model FLOPs, not hardware FLOPs). MFU = tokens/s · FLOPs/token / (peak FLOP/s · devices).
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp

from doge_jax.model.config import DogeConfig

# Dense bf16 peak FLOP/s per chip (vendor figures; fp32 on GPUs is far lower, see `peak_flops`).
PEAK_BF16 = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # Trillium (v6e)
    "tpu v6e": 918e12,
    "h100": 989e12,
    "h200": 989e12,
    "h800": 989e12,
    "a100": 312e12,
    "l4": 121e12,
    "a10g": 70e12,
    "rtx 4090": 165e12,
}
PEAK_FP32_GPU = {"h100": 67e12, "h200": 67e12, "a100": 19.5e12, "l4": 30e12, "rtx 4090": 82e12}


def matmul_params_per_token(cfg: DogeConfig) -> int:
    D, N, K, H, G, F, L = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                           cfg.num_dt_heads, cfg.intermediate_size, cfg.num_hidden_layers)
    attn = D * N * H + 2 * D * K * H + K * H * G + N * H * D  # q, k, v, dt_proj, o
    mlp = 3 * D * F
    if cfg.is_moe:
        mlp += D * 2 * cfg.num_keys + 2 * cfg.num_experts_per_tok * D
    return L * (attn + mlp) + D * cfg.vocab_size


def flops_per_token(cfg: DogeConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token; see the module docstring."""
    s_eff = min(seq_len, cfg.keep_window_size)
    attention = cfg.num_hidden_layers * 4 * cfg.num_attention_heads * cfg.head_dim * s_eff
    return 3.0 * (2.0 * matmul_params_per_token(cfg) + attention)


def _measured_cpu_flops() -> float:
    """CPUs have no datasheet peak we can read: the best fp32 GEMM rate XLA reaches here in 0.3 s of 1024³
    matmuls (the best call, so that other processes' load at that moment does not lower it much)."""
    n = 1024
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best, deadline = float("inf"), time.perf_counter() + 0.3
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def peak_flops(device=None, dtype: str = "bfloat16", override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for `dtype` compute: `override_tflops` if > 0, else the table above by
    device kind, else (CPU) a measured GEMM rate. None when unknown (MFU is then not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return _measured_cpu_flops()
    kind = device.device_kind.lower()
    table = PEAK_FP32_GPU if (dtype == "float32" and device.platform == "gpu") else PEAK_BF16
    for name, flops in table.items():
        if name in kind:
            return flops
    logging.warning("unknown peak FLOP/s for %r: set config.peak_tflops to report MFU", device.device_kind)
    return None
