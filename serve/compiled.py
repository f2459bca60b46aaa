"""The decode step's layers compiled with `torch.compile` (inductor, C++ wrapper): `--compile`.

At batch 1 a Doge-20M step is a few hundred small ATen calls, and on some CPUs each costs far more than the
arithmetic it does. Measured on the 2-core Intel Xeon (family 6 model 207, torch 2.13, 1 thread, Doge-20M shape,
the kinds `linear_choice.py` picks, bf16; `python benchmarks/bench_serve.py --compile-check --shapes 20m`): the
eager step 4.81 ms, with its layers compiled 3.31 ms, the same greedy tokens (batch 8: 7.20 -> 5.73 ms).
Inductor fuses the norms, RoPE, the `dt` bias and the residuals into a few C++ loops, and the C++ wrapper calls
the rest without Python in between.

What is compiled is `DecodeStep.layers_fn` only: the embedding lookup, RoPE's table, the final norm and the LM
head stay eager (the head is one call, bound by its bytes). Linears on dense float32 weights are ordinary
matmuls to inductor; oneDNN-packed and int8 layers are opaque to it, so each is called through one custom op
(`doge_serve::linear`, a registry index in, the layer's own forward inside). Rows reaching past the DMA window
(`keep_window_size`) run the eager layers, whose top-k inductor would need a graph of its own for.

The cost is compile time when the server starts: inductor compiles one program for batch 1 and one for any
larger batch and key length (dynamic shapes; the warm-up runs both before /health answers). On the 2-core Xeon
that is 64-100 s for Doge-20M and ~310 s for Doge-60M the first time (where, bound by its bytes, it gained
nothing); inductor's on-disk cache (`TORCHINDUCTOR_CACHE_DIR`, by default under
the system temp dir) makes later starts with the same model shape faster. It needs a C++ compiler (inductor's
requirement); without one the server refuses to start with a one-line error saying so.

Dynamo checks ~1,800 guards before each call, most on the step's own layers and weights. Dropping those (its
`guard_filter_fn` option, with each step compiled over a code object of its own so no step could run another's
graphs) was measured and not kept: a Doge-20M bf16 step of 3.104 ms became 3.052 (batch 8: 6.306 -> 6.257 ms;
2-core Xeon, same process, 9 interleaved rounds), 1.7 % for guards torch calls unsafe.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

_LAYERS: list[nn.Module] = []  # what each index of the custom op calls


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


def compiler() -> str | None:
    """The C++ compiler inductor will use, or None when there is none."""
    from torch._inductor import cpp_builder

    try:
        name = cpp_builder.get_cpp_compiler()
    except Exception:  # inductor raises when it finds no compiler
        return None
    return name if shutil.which(name) else None


def compile_layers(step) -> callable:
    """`step.layers_fn` compiled; packed and int8 linears of `step` go through `opaque` first."""
    if compiler() is None:
        raise ValueError("compile=True: torch.compile needs a C++ compiler (g++ or clang++) and none was found; "
                         "install one or start without --compile")
    for lay in step.layers:
        for name in ("qkv_call", "gate_up_call", "o_proj", "down_proj", "dt_proj"):
            fn = getattr(lay, name)
            module = getattr(fn, "__self__", None)
            if isinstance(module, nn.Module) and type(module) is not nn.Linear:
                setattr(lay, name, opaque(module))
    return torch.compile(step.layers_fn, dynamic=True, options={"cpp_wrapper": True})
