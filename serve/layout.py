"""Dense float32 weights laid out for MKL's small-batch GEMM: what the static decode step keeps float
(`linear_choice.py`) and what `--quantize int8` keeps float where the measurement says so (`quantize.py`)."""

from __future__ import annotations

import torch


def dense_layout(weight: torch.Tensor) -> torch.Tensor:
    """Float32 `weight` [O, I] stored column-major (its transpose contiguous): same values, shape and dtype.

    F.linear(x, W) computes x @ W^T. With W row-major, a batch-1 float32 call is MKL's GEMV; with W^T contiguous
    it is MKL's GEMM, which streams the weight faster. `python benchmarks/bench_serve.py --layout-check` (2-core
    AMD EPYC, 1 thread, row-major / column-major per call): Doge-20M q/k/v 46/32 us, o_proj 25/20, gate/up 93/65,
    down 36/27, LM head 2719/1322; the whole decode step 6.08 -> 4.42 ms. Only strides differ, so the model's
    own forward (prefill) runs on the same tensors."""
    if weight.dtype != torch.float32 or weight.dim() != 2:
        return weight
    return weight.t().contiguous().t()
