"""Linear layers on oneDNN's packed weight layout, in float32 or bfloat16, for the decode paths.

torch's float32 `F.linear` on CPU goes to MKL, which on the AMD EPYC box this was measured on runs small-batch
products far below what the core can do; oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor's CPU
freezing path uses) on a weight reordered once into its blocked layout does much better at every batch size a
server sees. `python benchmarks/bench_serve.py --layout-check` (1 thread; MKL on the row-major weight / MKL on a
column-major copy / packed): Doge-20M's 32768 x 256 LM head at batch 1 2622 / 1262 / 947 us, at batch 8 4156 /
4906 / 1510 us; the whole Doge-20M decode step 5.57 / 3.88 / 3.62 ms at batch 1 and 9.55 / 9.90 / 5.08 ms at
batch 8; Doge-60M 18.8 / 14.7 / 11.3 and 30.8 / 33.4 / 16.5 ms.

bfloat16 (`--dtype bfloat16`, the default on CPUs with avx512_bf16 or AMX, see `cpu.py`): the weight is packed in
bfloat16 and oneDNN multiplies with the CPU's bf16 dot products (`vdpbf16ps`), accumulating in float32; the input
is rounded to bfloat16 on the way in and the output (bfloat16) cast back to the input's dtype, so everything
around the linears (norms, `dt`, softmax, the residual stream, the KV cache) stays float32. Half the bytes a
token reads: Doge-20M's 26 MB of bf16 weights fit this EPYC's 32 MB L3, its 52 MB of float32 do not.

A packed weight replaces the dense one (no second copy): the model's own forward, which the server still uses for
prefill, runs on the same packed modules. q/k/v (and gate/up) are packed as one fused weight (`fused.py`).

`available(dtype)` says whether this torch has the kernels; without them the decode step keeps dense float32
weights, and bfloat16 is refused.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .fused import concat_bias

BATCH_HINT = 8  # the batch size oneDNN picks the blocked layout for: within ~10 % of the best from 1 to 16 rows


DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def available(dtype: torch.dtype = torch.float32) -> bool:
    """This torch has oneDNN's packed linear for `dtype`, and it computes x @ W^T + b on a tiny case (to bf16
    rounding for bfloat16)."""
    try:
        if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)  # not the global RNG: probing must not move a seeded run's stream
        w, x, b = (torch.randn(*shape, generator=g) for shape in ((24, 16), (3, 16), (24,)))
        y = PackedLinear(w, b, dtype)(x)
        atol = 1e-5 if dtype == torch.float32 else 0.1  # |y| ~ 4: a few bf16 roundings of the inputs and output
        return bool(torch.allclose(y, x @ w.t() + b, atol=atol))
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """y = x W^T + b with W [O, I] held in oneDNN's packed layout, in `dtype` (float32 or bfloat16); x and y in
    the caller's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype} must be one of {DTYPES}")
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), BATCH_HINT)
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()

    @classmethod
    def of(cls, linear: nn.Linear, dtype: torch.dtype = torch.float32) -> "PackedLinear":
        return cls(linear.weight, linear.bias, dtype)

    @classmethod
    def fused(cls, linears: list[nn.Linear], dtype: torch.dtype = torch.float32) -> "PackedLinear":
        """One packed layer computing every linear's outputs side by side."""
        return cls(torch.cat([m.weight.detach() for m in linears]), concat_bias(linears), dtype)  # [sum O, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # the model's forward: [B, T, I]; the decode step calls with [B, I] (fewer ops a token)
            return self(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype).contiguous(), self.packed, self.bias, "none", [], "")
        return y.to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.packed.element_size()

    def extra_repr(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn packed {dtype}"


def is_packable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.dtype == torch.float32


def pack_in_place(model: nn.Module, dtype: torch.dtype, keep: tuple[str, ...]) -> int:
    """Replace every float32 `nn.Linear` of `model` but those named in `keep` by a `PackedLinear` in `dtype`, one
    by one (no fusion): the dynamic decode path's bfloat16. Returns how many were replaced."""
    done = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name not in keep and is_packable(child):
                setattr(module, name, PackedLinear.of(child, dtype))
                done += 1
    return done
