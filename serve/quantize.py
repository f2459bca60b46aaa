"""Int8 weights for a transformers model's linear layers and LM head (`--quantize int8`), on two CPU kernels, or
float32 where neither is faster.

Each output channel gets one symmetric scale (max |w| / 127, rounded up to a bfloat16 value, so that the w8a16
kernel's bfloat16 scales are exact and |q| <= 127); the weights are int8, a quarter of float32's bytes. Doge-20M's
13 MB of int8 fit this EPYC's 32 MB L3. Two kernels multiply them, and which one runs depends on how many rows
the call has (`Int8Linear.table`, set per layer shape by measuring both at start-up: `kernel_choice.py`):

- "w8a16": `torch._weight_int8pack_mm`, torch's CPU kernel for int8 weights against bfloat16 activations (the
  input is rounded to bfloat16, the output cast back). A row-at-a-time kernel: the fastest at one or two rows,
  slow past a few (the 2-core EPYC at load ~7, all 33 of Doge-20M's linears at 1 / 8 / 16 rows: 2.6 / 7.3 /
  19.7 ms, against 3.2 / 4.9 / 7.2 ms on fbgemm below).
- "w8a8": int8 x int8 -> int32 products on fbgemm (`torch.ops.quantized.linear_dynamic`; `vpdpbusd` with
  AVX-512 VNNI), output float32, with every row of activations held as two 8-bit digits of a scale of its own.
  fbgemm quantises its input with one scale for the whole tensor; to make that one scale per row, each row is
  divided by its max |x| (so it lies in [-1, 1]) and two padding columns holding +1 and -1 (against zero weight
  columns) pin the tensor's range to exactly [-1, 1]: every call then quantises with the same scale (2/255) and
  zero point, the integer product is exact, and a row's output never depends on the other rows of the batch
  (a seeded request samples the same tokens whatever else is decoding). One digit (the first version) rounded
  activations to 8 bits, and on the trained tiny Doge below that cost top-1 agreement (98.00 % against w8a16's
  99.22 %, mostly on `down_proj`'s input). So each row is rounded to the grid itself (q1 / 127.5, q1 an integer in
  [-127, 127]) and its remainder, times 255, rounded again (q2), and both go through one call as 2M rows: the
  weight is read once, the activations are exact to 1/255^2 of the row's max, finer than w8a16's bfloat16. It
  costs time: 2M rows, and a dozen more small ops (2-core EPYC, 1 thread, 8 rows: a 1024 x 256 layer 133 us against
  61 with one digit; Doge-20M's 32768 x 256 LM head 1.11 ms against 0.49). So the LM head, whose leading logits
  are recomputed in float32 (`exact_head.py`, which bounds one digit's rounding, and so two's), keeps one digit
  (`digits`, set by `quantize_head`); the kernel choice times each layer as it runs. Offered only where the CPU
  has VNNI: without it fbgemm's u8 x s8 pairs saturate 16-bit sums unless the input range is halved.

- "float": the layer's own float32 weight (column-major, `layout.dense_layout`) on MKL, exact. Kept only by
  `keep_float=True` (the server's `quantize_linears`), measured beside the int8 kernels, and dropped once no row
  count chose it. Small products are call overhead rather than bytes on some CPUs, and there float32 is both
  faster and exact (see `kernel_choice.py`); `--quantize int8` promises int8 where it is faster, not everywhere.

The embedding table stays float32 (a lookup reads one row); a tied LM head gets its own int8 copy. The head's
leading logits are then recomputed in float32 from the embedding's rows (an untied head keeps its float32 weight
for this), within a proven bound of the int8 error, so greedy decoding picks what a float32 head picks
(`exact_head.py`).
`_weight_int8pack_mm` needs `in_features` to be a multiple of 16 (smaller or odd widths gave wrong results or
crashed on torch 2.13): other layers stay float32, and `quantize_linears` reports how many. `dt_proj` stays
float32 too: its output decides which keys survive DMA's top-k, a discrete choice that a small error flips
(measured on a trained tiny Doge with a 16-key window over 64 tokens: quantising `dt_proj` alone moved a logit by
0.53), and it is 0.03 % of Doge-20M's weights. CDMoE's `router_gate` stays float32 for the same reason: its
scores pick each token's experts from products of two top-k's, and it is what the bfloat16 step keeps in float32
too (`engine.KEEP_FLOAT32`). Quantised, it was also an int8 layer that the compiled step called through the
model's module, outside the views `compiled.py` builds.

Measured error against float32: tests/test_serve_quality.py (a tiny Doge trained on stdlib prose, scored on the
pydoc eval text) and serve/README.md.
"""

from __future__ import annotations

import bisect
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import exact_head
from .fused import concat_bias
from .layout import dense_layout

KERNEL_WIDTH = 16  # in_features must be a multiple of this for _weight_int8pack_mm
INT8_KERNELS = ("w8a16", "w8a8")
KERNELS = INT8_KERNELS + ("float",)  # "float": the kept float32 weight
_PAD = 4  # the +1, -1 range columns of the w8a8 input, padded to a multiple of 4 (VNNI's k-step)


def _quiet_prepack(qweight: torch.Tensor, scales: torch.Tensor):
    """fbgemm's packed weight. torch 2.13 warns that quantized tensor constructors are deprecated; this is the
    only way into fbgemm's kernels, and `available()` turns the kernel off if a torch drops them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zero = torch.zeros(qweight.shape[0], dtype=torch.long)
        q = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(q, None)


def _probe(kernel: str) -> bool:
    """`kernel` runs here and computes x @ W^T of its dequantised weights on a small case (own generator: the
    global RNG of a seeded run does not move)."""
    try:
        g = torch.Generator().manual_seed(0)
        linear = nn.Linear(32, 24, bias=False)
        linear.weight = nn.Parameter(torch.randn(24, 32, generator=g), requires_grad=False)
        layer = Int8Linear.from_linear(linear, table=[(1, kernel)])
        x = torch.randn(3, 32, generator=g)
        return bool(torch.allclose(layer.run(x, kernel), x @ layer.dequantized().t(), atol=0.15))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def available() -> tuple[str, ...]:
    """The int8 kernels that run here: w8a16 where torch has `_weight_int8pack_mm`; w8a8 where fbgemm's dynamic
    linear is in this torch, its engine is active, and the CPU has VNNI."""
    from . import cpu

    found = []
    if _probe("w8a16"):
        found.append("w8a16")
    if cpu.vnni() and torch.backends.quantized.engine in ("x86", "fbgemm") and _probe("w8a8"):
        found.append("w8a8")
    return tuple(found)


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 [O, I] and one bfloat16-exact float scale per output row.

    `table`: (most rows, kernel) pairs, ascending; a call with M rows runs the kernel of the first entry with
    most rows >= M (the last entry's beyond). Set by `kernel_choice.choose`; until then `default_table()`.
    `float_weight`: the float32 weight [O, I] (column-major) the "float" kernel multiplies, or None; freed by
    `drop_unused_float` once a measured table does not use it."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 table: list[tuple[int, str]] | None = None, float_weight: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)  # [O, I] int8
        self.register_buffer("scales", scales.float())  # [O] float32 holding bfloat16 values
        self.scales_bf16 = scales.to(torch.bfloat16)  # the w8a16 kernel's
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._fbgemm = None  # packed for w8a8 on first use
        self.float_weight = float_weight
        self.exact_rows: torch.Tensor | None = None  # see `rescore_leaders`
        self.digits = 2  # 8-bit digits per activation on w8a8 (the module docstring); the LM head's 1
        self.set_table(table if table is not None else default_table())

    def rescore_leaders(self, weight: torch.Tensor) -> None:
        """From now on, the outputs within the int8 error bound of each row's maximum are recomputed from `weight`
        [O, I] (float32, row-major: its rows are gathered), the weight this layer was quantised from
        (`exact_head.py`: for the LM head)."""
        if weight.shape != self.qweight.shape or weight.dtype != torch.float32:
            raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype}: expected float32 "
                             f"{tuple(self.qweight.shape)}")
        self.exact_rows = weight
        self._w2, self._r2 = exact_head.weight_stats(weight, self.qweight, self.scales)
        self.rescored = 0  # logits recomputed so far (a count for benchmarks)

    @classmethod
    def from_linear(cls, linear: nn.Linear, table: list[tuple[int, str]] | None = None,
                    keep_float: bool = False) -> "Int8Linear":
        """keep_float: also hold the float32 weight, for the "float" kernel (a copy, column-major)."""
        w = linear.weight.detach().float()  # [O, I]
        # Round the scale up to a bfloat16 value: the w8a16 kernel takes bf16 scales, rounding up keeps |q| <= 127.
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        scales_bf16 = scales.to(torch.bfloat16)
        scales_bf16 = torch.where(scales_bf16.float() < scales, _bf16_next_up(scales_bf16), scales_bf16)
        q = torch.round(w / scales_bf16.float()[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.contiguous(), scales_bf16, bias, table, dense_layout(w) if keep_float else None)

    @classmethod
    def concat(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing every part's outputs side by side (scales are per row, so this is exact)."""
        floats = [p.float_weight for p in parts]
        float_weight = dense_layout(torch.cat(floats)) if all(f is not None for f in floats) else None
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), concat_bias(parts),
                   parts[0].table, float_weight)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]  # [O, I]

    def set_table(self, table: list[tuple[int, str]]) -> None:
        """Run `table` from now on (the float weight stays until `drop_unused_float`)."""
        for _, kernel in table:
            if kernel not in KERNELS:
                raise ValueError(f"kernel={kernel!r} must be one of {KERNELS}")
        uses_float = any(kernel == "float" for _, kernel in table)
        if uses_float and self.float_weight is None:
            raise ValueError("kernel='float' needs the layer's float weight: quantise with keep_float=True")
        self.table = sorted(table)
        self._rows = [rows for rows, _ in self.table]
        self._last = len(self.table) - 1

    def drop_unused_float(self) -> None:
        """Free the float weight if the table does not use it (after the measurement)."""
        if all(kernel != "float" for _, kernel in self.table):
            self.float_weight = None

    def kernel_for(self, rows: int) -> str:
        return self.table[min(bisect.bisect_left(self._rows, rows), self._last)][1]

    def run(self, x: torch.Tensor, kernel: str) -> torch.Tensor:
        """x [M, I] float32 -> [M, O] float32 on `kernel`, without the bias."""
        if kernel == "w8a16":
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales_bf16).float()
        if kernel == "float":
            return F.linear(x, self.float_weight)
        if self._fbgemm is None:
            padded = torch.cat([self.qweight, torch.zeros(self.out_features, _PAD, dtype=torch.int8)], dim=1)
            self._fbgemm = _quiet_prepack(padded, self.scales)
            self._ends = torch.tensor([1.0, -1.0] + [0.0] * (_PAD - 2))
        M = x.shape[0]
        peak = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_(min=1e-30)  # [M, 1]
        scaled = x / peak  # [M, I] in [-1, 1]
        if self.digits == 1:  # the LM head (`quantize_head`): its leading logits are recomputed anyway
            x = torch.cat([scaled, self._ends.expand(M, _PAD)], dim=1)  # [M, I + 4], range exactly [-1, 1]
            return torch.ops.quantized.linear_dynamic(x, self._fbgemm, False).mul_(peak)
        # Two 8-bit digits per activation, as 2M rows of one product: q1 / 127.5 and, for the remainder (within a
        # half step, 1 / 255), scaled up by 255, q2 / 127.5. Both are on fbgemm's grid (step 2 / 255, with the
        # range pinned below), so it quantises them exactly; |x / peak - (q1 + q2 / 255) / 127.5| <= 1 / 255^2.
        q1 = torch.round(scaled * 127.5).clamp_(-127.0, 127.0)
        rest = (scaled - q1 / 127.5).mul_(255.0).clamp_(-1.0, 1.0)
        q2 = torch.round(rest * 127.5).clamp_(-127.0, 127.0)
        x = torch.cat([torch.cat([q1, q2]).div_(127.5), self._ends.expand(2 * M, _PAD)], dim=1)  # range: [-1, 1]
        y = torch.ops.quantized.linear_dynamic(x, self._fbgemm, False)  # [2M, O]
        return y[M:].div_(255.0).add_(y[:M]).mul_(peak)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The decode step's call is [rows, I] float32: no reshape or casts, and the table read inline. Those
        # no-ops cost ~6 us a call (Doge-20M's 33 int8 linears a step: ~0.2 ms of a ~2.8 ms step on the 2-core
        # EPYC, 1 thread), as much as the w8a16 kernel itself on the small shapes.
        flat = x.dim() == 2 and x.dtype == torch.float32
        x2 = x if flat else x.reshape(-1, self.in_features).float()
        kernel = self.table[min(bisect.bisect_left(self._rows, x2.shape[0]), self._last)][1]
        y = self.run(x2, kernel)
        if self.exact_rows is not None and kernel != "float":
            self.rescored += exact_head.rescore_(y, x2, self.exact_rows, kernel, self._w2, self._r2)
        if not flat:
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        table = ", ".join(f"{'<=' + str(rows) if rows < ANY_ROWS else 'more'} rows: {kernel}"
                          for rows, kernel in self.table)
        held = "int8 and float32" if self.float_weight is not None else "int8"
        leaders = ", leading outputs recomputed in float32" if self.exact_rows is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {held} ({table}){leaders}"


ANY_ROWS = 1 << 30


def default_table() -> list[tuple[int, str]]:
    """Before any measurement: w8a16 up to 4 rows and w8a8 beyond where both run (what the 2-core EPYC measured
    for Doge-20M's layers), else the one that runs."""
    kernels = available()
    if not kernels:
        raise RuntimeError("no int8 kernel runs here (neither torch._weight_int8pack_mm nor fbgemm's dynamic linear "
                           "on a VNNI CPU); serve without --quantize int8")
    if len(kernels) == 2:
        return [(4, "w8a16"), (ANY_ROWS, "w8a8")]
    return [(ANY_ROWS, kernels[0])]


def _bf16_next_up(x: torch.Tensor) -> torch.Tensor:
    """The next larger bfloat16 value of positive `x` (bfloat16): one step of its 7-bit mantissa."""
    bits = x.view(torch.int16) + 1
    return bits.view(torch.bfloat16)


KEEP_FLOAT = ("dt_proj", "router_gate")  # linears kept in float32 by name (see the module docstring)


def quantize_linears(model: nn.Module, keep_float: bool = False) -> tuple[int, list[str]]:
    """Replace every `nn.Linear` of `model` (LM head included) but `KEEP_FLOAT` by an `Int8Linear`, in place;
    keep_float: each also holds its float32 weight until `kernel_choice.choose` has measured it (the server).
    The LM head recomputes its leading logits in float32 (`quantize_head`).

    Returns (how many were quantised, names of the linears left in float32 because of the kernel's width rule).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    done, skipped = 0, []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child_name in KEEP_FLOAT:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if child.in_features % KERNEL_WIDTH:
                skipped.append(full)
                continue
            if child is head:
                quantize_head(model, keep_float=keep_float)
            else:
                setattr(module, child_name, Int8Linear.from_linear(child, keep_float=keep_float))
            done += 1
    return done, skipped


def quantize_head(model: nn.Module, keep_float: bool = False) -> Int8Linear | None:
    """Replace the LM head (`get_output_embeddings()`, an `nn.Linear`) by an `Int8Linear` that recomputes its
    leading logits in float32 (`exact_head.py`) from the tied embedding's rows, or from its own float32 weight,
    kept, if untied. None (nothing changed) where no int8 kernel runs here or the head's width does not suit it.

    Alone, this is the bfloat16 server's head (`Engine`): half a bfloat16 head's bytes, the step's largest read
    (Doge-20M on the 2-core EPYC, 1 thread, from memory: 1 row 0.61 ms against 1.39 ms in bfloat16; 8 rows 1.37
    on w8a8 against 1.58; 16 rows 1.92 against 2.20), with an argmax float32's rather than bfloat16's."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.in_features % KERNEL_WIDTH or not available():
        return None
    layer = Int8Linear.from_linear(head, keep_float=keep_float)
    layer.rescore_leaders(head.weight.detach().float().contiguous())  # the tied embedding's rows, or kept
    layer.digits = 1  # w8a8 at half the time of 2 digits; greedy stays float32's, the leaders being recomputed
    model.set_output_embeddings(layer)
    return layer
