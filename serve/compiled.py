"""The decode step's layers compiled with `torch.compile` (inductor, C++ wrapper, freezing): `--compile`.

At batch 1 a Doge-20M step is a few hundred small ATen calls, and on some CPUs each costs far more than the
arithmetic it does. Compiled, the norms, RoPE, the `dt` bias and the residuals become a few C++ loops, and the
C++ wrapper calls the rest without Python in between.

The weights are frozen: each linear of the compiled layers is a `FrozenLinear` (a dense parameter in the step's
dtype for its shape: bfloat16 where the eager step packs bf16, float32 elsewhere), and inductor's freezing pass
turns every parameter into a constant and prepacks it. An int8 layer whose measured table (`kernel_choice.py`)
runs w8a16 at every row count becomes inductor's weight-only int8 pattern (`FrozenInt8Linear`); one whose table
mixes kernels by rows, or runs w8a8 (fbgemm, which inductor does not lower), is called through one opaque custom
op (`doge_serve::linear`, a registry index in, the layer's own forward inside). Then inductor's autotuning
(`OPTIONS`) times, for each product's shape and row count, the ATen kernel (oneDNN's `_linear_pointwise` for
bfloat16, MKL's packed `_mkl_linear` for float32, `_weight_int8pack_mm` for int8) against its own C++ micro-GEMM,
fused with the loops around it, and keeps the faster: at 1 row mostly the micro-GEMM, at 8 rows often oneDNN.

Measured on the 2-core AMD EPYC (Doge-20M, 1 thread, `bench_serve.py --compile-check`): the first version, which
called every packed and int8 linear through the opaque op (each a trip back into Python), gained 1.38x at batch 1
in bf16; frozen weights on ATen's kernels 1.58x; with the autotuned micro-GEMMs 2.2-2.5x (figures in
serve/README.md).

Inductor writes its loops for the thread count torch has when it compiles, and dynamo guards on that count: the
engine's warm-up runs every count its thread chooser tries (`threads.py`: 1 and all cores), so each gets programs
of its own (4 on 2 cores: batch 1 and larger, per count; ~25 s each for Doge-20M on the 2-core EPYC). `--threads
N` fixes the count, and so compiles half as many on 2 cores.

What is compiled is `DecodeStep.layers_fn` only: the embedding lookup, RoPE's table, the final norm and the LM
head stay eager (the head is one call, bound by its bytes, and its int8 form recomputes leading logits in NumPy,
`exact_head.py`). Rows reaching past the DMA window (`keep_window_size`) run the eager layers, whose top-k
inductor would need a graph of its own for.

The cost is start-up and memory. Inductor compiles one program for batch 1 and one for any larger batch and key
length (dynamic shapes; the warm-up runs both, at each thread count, before /health answers), autotuning each
product (~3 s each): 100-132 s of a Doge-20M server's first warm-up on the 2-core EPYC (54 s for the step's two
programs at one thread in `--compile-check`). Later starts reuse what inductor keeps on disk: its autotuning
timings, and the C++ builds once `stable_cpp_source` keeps the constants' addresses out of the source (the two
1-thread programs: 53 -> 38 s). Not its FX graph cache: the frozen oneDNN-packed weights cannot be pickled, so
inductor bypasses it, and dynamo, AOT autograd, freezing and lowering run at every start. A build is reused when
a start's own measurements (`linear_choice`, the int8 tables) pick the kernels an earlier start picked. The
frozen weights are a second copy beside the eager step's (which prefill and rows past the window use), and
compiling holds more: the Doge-20M servers peaked at ~905 MiB RSS against ~655-695 without `--compile`. It needs a
C++ compiler (inductor's requirement); without one the server refuses to start with a one-line error saying so.
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import types

import torch
import torch.nn.functional as F
from torch import nn

from .fused import concat_bias
from .quantize import Int8Linear

_LAYERS: list[nn.Module] = []  # what each index of the custom op calls

OPTIONS = {  # inductor's, for the layers
    "cpp_wrapper": True,
    "freezing": True,
    # Every linear timed between oneDNN / MKL (ATen) and inductor's own C++ micro-GEMM for its shape and row count,
    # the faster kept: at 1 row the micro-GEMM ran a bf16 512 x 256 product in 7 us against oneDNN's 25 (2-core EPYC).
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,  # no timing table on stderr for every shape
    "max_autotune_report_choices_stats": False,
}

# (attribute of the step's `_Layer`, the model's linears it computes): what `float_weights` collects
LINEARS = (("qkv_call", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           ("gate_up_call", ("mlp.gate_proj", "mlp.up_proj")),
           ("o_proj", ("self_attn.o_proj",)), ("down_proj", ("mlp.down_proj",)), ("dt_proj", ("self_attn.dt_proj",)))


@torch.library.custom_op("doge_serve::linear", mutates_args=())
def _linear(x: torch.Tensor, index: int) -> torch.Tensor:
    return _LAYERS[index](x)


@_linear.register_fake
def _(x: torch.Tensor, index: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _LAYERS[index].out_features)


def opaque(layer: nn.Module):
    """`layer`'s forward as one custom-op call inductor does not look into."""
    index = len(_LAYERS)
    _LAYERS.append(layer)
    return lambda x: torch.ops.doge_serve.linear(x, index)


class FrozenLinear(nn.Module):
    """y = x W^T + b with W a dense parameter in `dtype`, x and y in the caller's dtype: what inductor freezes into
    a prepacked constant of its own when the layers are compiled."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(dtype).contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype).contiguous(), requires_grad=False)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def float_weights(layer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """{`_Layer` attribute: (weight [O, I], bias) of its linears side by side} for a decoder layer's float32
    `nn.Linear`s, read before the step re-lays them out (None where they are something else: int8)."""
    out = {}
    for name, paths in LINEARS:
        linears = [layer.get_submodule(p) for p in paths]
        if all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears):
            out[name] = torch.cat([m.weight.detach() for m in linears]), concat_bias(linears)
        else:
            out[name] = None
    return out


def compiler() -> str | None:
    """The C++ compiler inductor will use, or None when there is none."""
    from torch._inductor import cpp_builder

    try:
        name = cpp_builder.get_cpp_compiler()
    except Exception:  # inductor raises when it finds no compiler
        return None
    return name if shutil.which(name) else None


class FrozenInt8Linear(nn.Module):
    """An `Int8Linear` on its w8a16 kernel, written as inductor's weight-only int8 pattern (a product with the int8
    weight cast to the bfloat16 input's dtype, times the scales), which it lowers to the `_weight_int8pack_mm` the
    eager layer calls, or to its own micro-GEMM on the int8 weight where autotuning timed that faster: the same
    product without a custom op around it (the micro-GEMM may sum in another order)."""

    def __init__(self, layer: Int8Linear):
        super().__init__()
        self.qweight = nn.Parameter(layer.qweight, requires_grad=False)  # the layer's own tensors, not copies
        self.scales = nn.Parameter(layer.scales_bf16, requires_grad=False)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (torch.mm(x.to(torch.bfloat16), self.qweight.t().to(torch.bfloat16)) * self.scales).float()
        return y if self.bias is None else y + self.bias


def _int8_view(layer: Int8Linear) -> nn.Module | None:
    """What compiles an int8 layer whose measured table runs one kernel at every row count; None for a mix."""
    kernels = {kernel for _, kernel in layer.table}
    if kernels == {"w8a16"}:
        return FrozenInt8Linear(layer)
    if kernels == {"float"}:
        return FrozenLinear(layer.float_weight, layer.bias, torch.float32)
    return None


class CompiledLayers(nn.Module):
    """The step's `layers_fn` over copies of its layers whose linears are `FrozenLinear`s (float weights in the
    step's dtype per shape) and `FrozenInt8Linear`s (int8 layers on w8a16 at every row count), compiled by inductor
    with freezing; other int8 layers (a table mixing kernels by rows) go through `opaque`. Built on the first
    call: an int8 layer's table is measured at warm-up, after the step is built."""

    def __init__(self, step, weights: list[dict]):
        super().__init__()
        self._layers_fn = step.layers_fn  # the step's own (a test wraps the eager one it calls)
        self._step = [step]  # in a list: not a submodule
        self.linears = nn.ModuleList()
        self._float: list[dict[str, FrozenLinear]] = []  # per layer, converted now: the float32 copies go
        for found in weights:
            frozen = {}
            for name, pair in found.items():
                if pair is not None:
                    weight, bias = pair
                    dtype = step.weight_dtype if step.is_packed(tuple(weight.shape)) else torch.float32
                    frozen[name] = FrozenLinear(weight, bias, dtype)
            self._float.append(frozen)
        self.layers: list = []
        self._compiled = None

    def _build(self) -> None:
        step = self._step[0]
        for lay, frozen in zip(step.layers, self._float):
            view = copy.copy(lay)  # the eager layer, its linears replaced: `layers_fn` and `mlp` read them
            for name, _ in LINEARS:
                linear = frozen.get(name)
                if linear is None:
                    layer = getattr(lay, name).__self__  # an Int8Linear's forward
                    linear = _int8_view(layer) if isinstance(layer, Int8Linear) else None
                    if linear is None:
                        setattr(view, name, opaque(layer))
                        continue
                self.linears.append(linear)
                setattr(view, name, linear.forward)
            self.layers.append(view)
        self._float = []
        options = dict(OPTIONS)
        if any(lay.moe for lay in step.layers):
            # CDMoE: inductor (torch 2.13) fails an assertion fusing the router's reductions into a micro-GEMM's
            # epilogue (lowering.py `len(index) == len(kept_idx)`); unfused, the same programs compile.
            options["epilogue_fusion"] = False
        # Dynamo keeps its programs, and counts recompiles against its limit (8), per code object: a copy of
        # `_forward`'s gives each instance its own (an engine makes up to 4 programs; a second engine in the
        # process, or a test suite, would otherwise share the first's count).
        forward = types.FunctionType(CompiledLayers._forward.__code__.replace(), globals(), "_forward")
        # One graph or an error: a graph break would leave pieces that dynamo recompiles per thread count and
        # shape until its limit, then runs eagerly, a slow server that says nothing.
        self._compiled = torch.compile(types.MethodType(forward, self), dynamic=True, fullgraph=True,
                                       options=options)

    def _forward(self, *args) -> torch.Tensor:
        return self._layers_fn(*args, layers=self.layers)

    def forward(self, *args) -> torch.Tensor:
        if self._compiled is None:
            self._build()
        # Dynamo reads inductor's `freezing` flag when it traces (parameters become constants only then, and only
        # without grad): set for these calls alone, not for the rest of the process.
        config = torch._inductor.config
        before, config.freezing = config.freezing, True
        try:
            with stable_cpp_source():
                return self._compiled(*args)
        finally:
            config.freezing = before


@contextlib.contextmanager
def stable_cpp_source():
    """Inductor's C++ wrapper without the constants' addresses, for the calls inside: a restart reuses its build.

    Inductor (torch 2.13) heads the wrapper's C++ with a comment per constant (name, dtype, shape, strides and
    `hash(tensor)`, the tensor's id), so each process writes a source it has never built, and g++ rebuilds every
    program at every start: 15 of the 50 s that the two 1-thread programs of a Doge-20M server took to compile
    on the 2-core EPYC with a warm cache. The constants are the C++ entry's inputs, passed by the Python module
    that loads it (a fresh module per program, the constants set on it), so two programs whose code is the same
    can share one build. The comment keeps its other fields: only the trailing id goes. Where the method or its
    format is not what it was in 2.13, nothing is changed (each start then compiles its C++ again)."""
    try:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    except ImportError:
        yield
        return
    original = CppWrapperCpu.__dict__.get("write_constant")
    if original is None:
        yield
        return

    def write_constant(self, name, hashed):
        fields = hashed.rsplit(" ", 1) if isinstance(hashed, str) else []
        if len(fields) == 2 and re.fullmatch(r"-?[0-9a-f]+", fields[1]):
            hashed = fields[0]
        return original(self, name, hashed)

    CppWrapperCpu.write_constant = write_constant
    try:
        yield
    finally:
        CppWrapperCpu.write_constant = original


def compile_layers(step, weights: list[dict]) -> CompiledLayers:
    """`step.layers_fn` compiled over `weights` (`float_weights` of each layer, read before the step re-laid
    them out)."""
    if compiler() is None:
        raise ValueError("compile=True: torch.compile needs a C++ compiler (g++ or clang++) and none was found; "
                         "install one or start without --compile")
    return CompiledLayers(step, weights)
