"""Several linears of one module run as one matmul, and the model's own forward still works.

transformers calls q_proj, k_proj, v_proj (gate_proj, up_proj) one after another on the same tensor. The decode
step wants them as one product with one weight read. `fuse_in_place` puts a fused layer (any module computing
every part's outputs side by side: a packed float32/bfloat16 linear, an int8 one) in their place: each
projection becomes a `FusedPart`, a slice of the fused output, which the first part's call computes and the
others reuse (`_Memo`), so the model's forward (prefill, prompt scoring) runs on the same weights and no weight
is held twice.
"""

from __future__ import annotations

import torch
from torch import nn


def concat_bias(linears: list[nn.Module]) -> torch.Tensor | None:
    """The biases of linears fused side by side (zeros for those without one); None when none has one."""
    present = [m.bias for m in linears if m.bias is not None]
    if not present:
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=present[0].dtype)
                      for m in linears])


class _Memo:
    """The fused layer's output for one input tensor, handed to each part at most once.

    The first part's call computes the fused output, the others slice it, and once every part has had it the
    memo is dropped. A part asking again, or a different input tensor (or, outside inference mode, the same
    tensor modified in place since: its version counter moved), computes afresh."""

    def __init__(self, layer: nn.Module, parts: int):
        self.layer, self.parts = layer, parts
        self.x: torch.Tensor | None = None
        self.version = None
        self.y: torch.Tensor | None = None
        self.served: set[int] = set()

    def __call__(self, x: torch.Tensor, part: int) -> torch.Tensor:
        version = None if x.is_inference() else x._version
        if x is not self.x or version != self.version or part in self.served:
            self.y = self.layer(x)
            self.x, self.version, self.served = x, version, set()
        y = self.y
        self.served.add(part)
        if len(self.served) == self.parts:
            self.x = self.y = None
        return y


class FusedPart(nn.Module):
    """Output columns [start, stop) of a fused layer: stands in for one of the linears it fused."""

    def __init__(self, memo: _Memo, index: int, start: int, stop: int):
        super().__init__()
        self._memo = memo  # not a submodule: the fused layer belongs to the decode step
        self.index, self.start, self.stop = index, start, stop
        self.in_features, self.out_features = memo.layer.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._memo(x, self.index)[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns {self.start}:{self.stop}"


def fuse_in_place(parent: nn.Module, names: list[str], layer: nn.Module) -> nn.Module:
    """Replace `parent`'s linears `names` by `FusedPart`s of `layer` (which computes their outputs side by side,
    in this order) and return `layer`, for callers that want all outputs at once."""
    widths = [getattr(parent, n).out_features for n in names]
    if sum(widths) != layer.out_features:
        raise ValueError(f"{names} have {sum(widths)} outputs together, the fused layer {layer.out_features}")
    memo, start = _Memo(layer, len(names)), 0
    for index, (name, width) in enumerate(zip(names, widths)):
        setattr(parent, name, FusedPart(memo, index, start, start + width))
        start += width
    return layer
