"""Float32 linear layers on oneDNN's packed weight layout, for the static decode path.

torch's float32 `F.linear` on CPU goes to MKL, which on the AMD EPYC box this was measured on runs small-batch
products far below what the core can do; oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor's CPU
freezing path uses) on a weight reordered once into its blocked layout does much better at every batch size a
server sees. `python benchmarks/bench_serve.py --layout-check` (1 thread; MKL on the row-major weight / MKL on a
column-major copy / packed): Doge-20M's 32768 x 256 LM head at batch 1 2622 / 1262 / 947 us, at batch 8 4156 /
4906 / 1510 us; the whole Doge-20M decode step 5.57 / 3.88 / 3.62 ms at batch 1 and 9.55 / 9.90 / 5.08 ms at
batch 8; Doge-60M 18.8 / 14.7 / 11.3 and 30.8 / 33.4 / 16.5 ms.

A packed weight replaces the dense one (no second copy): the model's own forward, which the server still uses for
prefill, runs on the same packed modules. q/k/v (and gate/up) are packed as one fused weight; the model's
separate projections become `FusedPart`s, slices of the fused output, computed once for the consecutive calls
on one tensor that transformers makes (`_Memo`).

`available()` says whether this torch has the kernels; without them the decode step keeps dense weights.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

BATCH_HINT = 8  # the batch size oneDNN picks the blocked layout for: within ~10 % of the best from 1 to 16 rows


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """This torch has oneDNN's packed float32 linear, and it computes x @ W^T + b on a tiny case."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)  # not the global RNG: probing must not move a seeded run's stream
        w, x, b = (torch.randn(*shape, generator=g) for shape in ((24, 16), (3, 16), (24,)))
        packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return bool(torch.allclose(y, x @ w.t() + b, atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


def concat_bias(linears: list[nn.Module]) -> torch.Tensor | None:
    """The biases of linears fused side by side (zeros for those without one); None when none has one."""
    present = [m.bias for m in linears if m.bias is not None]
    if not present:
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=present[0].dtype)
                      for m in linears])


class PackedLinear(nn.Module):
    """y = x W^T + b with W [O, I] float32 held in oneDNN's packed layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), BATCH_HINT)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    @classmethod
    def of(cls, linear: nn.Linear) -> "PackedLinear":
        return cls(linear.weight, linear.bias)

    @classmethod
    def fused(cls, linears: list[nn.Linear]) -> "PackedLinear":
        """One packed layer computing every linear's outputs side by side."""
        return cls(torch.cat([m.weight.detach() for m in linears]), concat_bias(linears))  # [sum O, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), self.packed, self.bias,
                                               "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn packed"


class _Memo:
    """The fused layer's output for one input tensor, handed to each part at most once.

    transformers calls q_proj, k_proj, v_proj (gate_proj, up_proj) one after another on the same tensor: the
    first call computes the fused output, the others slice it, and once every part has had it the memo is
    dropped. A part asking again, or a different input tensor (or, outside inference mode, the same tensor
    modified in place since: its version counter moved), computes afresh."""

    def __init__(self, layer: PackedLinear, parts: int):
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
    """Output columns [start, stop) of a fused packed layer: stands in for one of the linears it fused."""

    def __init__(self, memo: _Memo, index: int, start: int, stop: int):
        super().__init__()
        self._memo = memo  # not a submodule: the fused layer belongs to the decode step
        self.index, self.start, self.stop = index, start, stop
        self.in_features, self.out_features = memo.layer.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._memo(x, self.index)[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns {self.start}:{self.stop}"


def fuse_in_place(parent: nn.Module, names: list[str]) -> PackedLinear:
    """Packs `parent`'s linears `names` into one fused layer, replaces each by its `FusedPart`, and returns the
    fused layer (for callers that want all outputs at once)."""
    linears = [getattr(parent, n) for n in names]
    layer = PackedLinear.fused(linears)
    memo, start = _Memo(layer, len(names)), 0
    for index, (name, linear) in enumerate(zip(names, linears)):
        setattr(parent, name, FusedPart(memo, index, start, start + linear.out_features))
        start += linear.out_features
    return layer


def is_packable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.dtype == torch.float32
