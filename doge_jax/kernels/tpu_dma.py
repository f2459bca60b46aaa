"""Placeholder until the Mosaic TPU kernel lands (same branch of work): every call is refused in one line."""

from __future__ import annotations


def tpu_unsupported_reason(q, k, dt, mask, *, dropout_rate: float = 0.0) -> str | None:
    return "on this build (the Mosaic TPU kernel is not merged yet)"


def dma_pallas_tpu(q, k, v, dt, mask, *, scale):
    raise ValueError("dma_pallas_tpu cannot run on this build (the Mosaic TPU kernel is not merged yet)")
