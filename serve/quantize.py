"""Int8 weight-only quantisation of a transformers model's linear layers (`--quantize int8`).

Each output channel gets one symmetric scale (max |w| / 127, rounded to a bfloat16 value so that the kernel's
bfloat16 scales are exact); weights are stored as int8 and multiplied by `torch._weight_int8pack_mm`, torch's
CPU kernel for int8 weights, which reads a quarter of the float32 bytes. That kernel is fast only with bfloat16
activations (measured on a 2-core AMD EPYC: Doge-20M's 32k x 256 LM head, batch 1, 0.28 ms against 2.4 ms in
float32, and 5.6 ms with float32 activations), so activations are rounded to bfloat16 on the way in and the
output cast back. The embedding table stays float32 (a lookup reads one row); a tied LM head gets its own int8
copy. The kernel needs `in_features` to be a multiple of 16 (smaller or odd widths gave wrong results or crashed
on torch 2.13): other layers stay float32, and `quantize_linears` reports how many. `dt_proj` stays float32 too:
its output decides which keys survive DMA's top-k, a discrete choice that a small error flips (measured on a
trained tiny Doge with a 16-key window over 64 tokens: quantising `dt_proj` alone moved a logit by 0.53), and it
is 0.03 % of Doge-20M's weights.

Measured error: `INT8_LOGIT_*` in tests/test_serve_compiled.py (a briefly trained tiny Doge) and serve/README.md.
"""

from __future__ import annotations

import torch
from torch import nn

from .packed_linear import concat_bias

KERNEL_WIDTH = 16  # in_features must be a multiple of this for _weight_int8pack_mm


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 [O, I] and one bfloat16-exact float scale per output row."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)  # [O, I] int8
        self.register_buffer("scales", scales)  # [O] bfloat16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()  # [O, I]
        # Round the scale up to a bfloat16 value: the kernel takes bf16 scales, and rounding up keeps |q| <= 127.
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        scales_bf16 = scales.to(torch.bfloat16)
        scales_bf16 = torch.where(scales_bf16.float() < scales, _bf16_next_up(scales_bf16), scales_bf16)
        q = torch.round(w / scales_bf16.float()[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.contiguous(), scales_bf16.contiguous(), bias)

    @classmethod
    def concat(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing every part's outputs side by side (scales are per row, so this is exact)."""
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), concat_bias(parts))

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]  # [O, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight,
                                               self.scales)  # [M, O] bfloat16
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _bf16_next_up(x: torch.Tensor) -> torch.Tensor:
    """The next larger bfloat16 value of positive `x` (bfloat16): one step of its 7-bit mantissa."""
    bits = x.view(torch.int16) + 1
    return bits.view(torch.bfloat16)


KEEP_FLOAT = ("dt_proj",)  # linears kept in float32 by name (see the module docstring)


def quantize_linears(model: nn.Module) -> tuple[int, list[str]]:
    """Replace every `nn.Linear` of `model` (LM head included) but `KEEP_FLOAT` by an `Int8Linear`, in place.

    Returns (how many were quantised, names of the linears left in float32 because of the kernel's width rule).
    """
    done, skipped = 0, []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child_name in KEEP_FLOAT:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if child.in_features % KERNEL_WIDTH:
                skipped.append(full)
                continue
            setattr(module, child_name, Int8Linear.from_linear(child))
            done += 1
    return done, skipped
