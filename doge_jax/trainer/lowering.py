"""The full sharded train step, lowered for a platform this host may not have, and what its module holds.

    text = lower_train_step(config, mesh, "tpu")                      # StableHLO, nothing allocated or compiled
    report = kernel_report(text)                                      # the kernel calls and where they sit

The step is the trainer's own (`Trainer.lower_train_step`: the state/batch shardings of its setup, traced under
`jax.set_mesh`), so what lowers here is what a run on that mesh would compile. Lowering for a GPU or
TPU from a CPU host runs inside `doge_jax.kernels.target.lowering_for(platform)`, so that the kernels emit their
real custom calls rather than interpret mode. The checks read the StableHLO text, which is partitioned only
later (by the target's compiler), so "where a kernel sits" means: inside an `sdy.manual_computation` (the
shard_map) whose operands are split as the per-shard kernel expects.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile

import jax
import jax.numpy as jnp


# The custom-call targets of the Pallas kernels, by platform.
KERNEL_TARGETS = {"cuda": ("__gpu$xla.gpu.triton",), "tpu": ("tpu_custom_call",)}
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "collective_permute",
               "collective_broadcast")


def batch_shapes(config) -> dict:
    """The abstract global batch of one step: [A, batch_size / A, seq_len] int32, A = grad_accum_steps (1 for
    "auto", which a run resolves by compiling: doge_jax/trainer/fit.py)."""
    accum = 1 if config.grad_accum_steps == "auto" else config.grad_accum_steps
    shape = (accum, config.batch_size // accum, config.seq_len)
    return {name: jax.ShapeDtypeStruct(shape, jnp.int32) for name in ("input_ids", "targets", "segment_ids",
                                                                      "positions")}


def lowered_train_step(config, mesh, platform: str | None = None) -> jax.stages.Lowered:
    """`config`'s train step on `mesh`, set up by the Trainer itself (in a scratch workdir: nothing is written
    that outlives the call) and lowered for `platform` (None: this host)."""
    from doge_jax.trainer.loop import Trainer

    with tempfile.TemporaryDirectory(prefix="doge-lowering-") as workdir:
        return Trainer(config, workdir, mesh=mesh).lower_train_step(batch_shapes(config), platform=platform)


def lower_train_step(config, mesh, platform: str) -> str:
    """The StableHLO text of `config`'s sharded train step on `mesh`, lowered for `platform` ('cuda', 'tpu',
    'cpu'), with the kernels traced for that platform. Allocates nothing and compiles nothing."""
    return lowered_train_step(config, mesh, platform).as_text()


@dataclasses.dataclass
class KernelCall:
    name: str  # the kernel's name (pallas_call name=...), e.g. "dma_forward"
    operand_shapes: list[str]  # the StableHLO tensor types of its operands, e.g. "tensor<2x2x2048x128xbf16>"
    manual_axes: tuple[str, ...] | None  # the enclosing manual_computation's manual axes; None: outside any


@dataclasses.dataclass
class KernelReport:
    calls: list[KernelCall]
    manual_regions: int  # sdy.manual_computation ops in the module
    region_in_shardings: list[str]  # each region's in_shardings attribute, as written
    collectives: dict[str, int]  # collective op → count, over the whole module (before partitioning)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.calls:
            out[c.name] = out.get(c.name, 0) + 1
        return out


_CALL = re.compile(r"stablehlo\.custom_call @(?P<target>[\w$.]+)\((?P<args>[^)]*)\)(?P<attrs>.*)$")
_MANUAL_OPEN = re.compile(r"sdy\.manual_computation\(.*in_shardings=(?P<ins>\[.*?\]) out_shardings=.*"
                          r"manual_axes=\{(?P<axes>[^}]*)\}")
_KERNEL_NAME = re.compile(r'(?:name = |kernel_name = |"name":\s*)"(?P<name>[\w.]+)"')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _kernel_name(line: str) -> str:
    """The Pallas kernel's name from its custom call line (Triton: name in backend_config; Mosaic: kernel_name)."""
    found = _KERNEL_NAME.search(line)
    return found.group("name") if found else "?"


_FUNC = re.compile(r"func\.func (?:public |private )?@(?P<name>[\w$.]+)\(")
_FUNC_CALL = re.compile(r"(?:func\.)?call @(?P<name>[\w$.]+)\(")


def kernel_report(text: str, platform: str) -> KernelReport:
    """Every kernel custom call of `platform` in the StableHLO `text`, with its enclosing manual region, counted
    once per execution path from @main: a kernel inside a private function (a jit call, e.g. the forward
    kernels, so that a remat recompute nobody reads is dropped) counts at every call site of that function.

    Regions are tracked by indentation-independent brace depth: a manual_computation's body opens with `{` at
    the end of its line and closes with the `}` that returns to that depth."""
    targets = KERNEL_TARGETS[platform]
    ins = []
    # Per function, in order: ("kernel", KernelCall) and ("call", callee, manual axes at the call site).
    events: dict[str, list[tuple]] = {}
    current = ""
    fn_depth = 0
    stack: list[tuple[int, tuple[str, ...]]] = []  # (brace depth at which the region's body ends, manual axes)
    depth = 0
    collectives = {c: 0 for c in COLLECTIVES}
    for line in text.splitlines():
        fn = _FUNC.search(line)
        if fn:
            current, fn_depth = fn.group("name"), depth
            events.setdefault(current, [])
        manual = _MANUAL_OPEN.search(line)
        if manual:
            axes = tuple(a.strip().strip('"') for a in manual.group("axes").split(",") if a.strip())
            stack.append((depth, axes))
            ins.append(manual.group("ins"))
        for c in COLLECTIVES:
            if f"stablehlo.{c}" in line or f'"stablehlo.{c}"' in line:
                collectives[c] += 1
        here = stack[-1][1] if stack else None
        call = _CALL.search(line)
        if call and call.group("target") in targets:
            types = line[line.rfind(": (") + 3:line.rfind(") ->")] if ": (" in line else ""
            events.setdefault(current, []).append(("kernel", KernelCall(
                name=_kernel_name(line), operand_shapes=re.findall(r"tensor<[^>]*>", types), manual_axes=here)))
        elif not fn:
            callee = _FUNC_CALL.search(line)
            if callee:
                events.setdefault(current, []).append(("call", callee.group("name"), here))
        code = _STRING.sub('""', line)  # a kernel's serialized IR may hold unbalanced braces
        depth += code.count("{") - code.count("}")
        while stack and depth <= stack[-1][0]:
            stack.pop()
        if fn is None and depth <= fn_depth:
            current = ""

    def expand(name: str, outer: tuple[str, ...] | None, seen: tuple[str, ...]) -> list[KernelCall]:
        out = []
        for event in events.get(name, []):
            if event[0] == "kernel":
                k = event[1]
                out.append(dataclasses.replace(k, manual_axes=k.manual_axes if k.manual_axes is not None else outer))
            elif event[1] not in seen:
                out += expand(event[1], event[2] if event[2] is not None else outer, seen + (event[1],))
        return out

    calls = expand("main", None, ("main",)) if "main" in events else [e[1] for es in events.values() for e in es
                                                                        if e[0] == "kernel"]
    return KernelReport(calls=calls, manual_regions=len(ins), region_in_shardings=ins,
                        collectives={c: n for c, n in collectives.items() if n})


def compile_on_host(config, mesh) -> str:
    """The compiled (partitioned) HLO text of the same sharded step for this host's devices, kernels in
    interpret mode: what the SPMD partitioner inserts around each shard_map is decided before any backend
    code, so the collectives read here are those a GPU/TPU compile inserts around the kernel calls."""
    return lowered_train_step(config, mesh).compile().as_text()


_HLO_COLLECTIVE = re.compile(r"= (?P<type>\([^=]*?\)|\S+) (?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
                             r"collective-permute|collective-broadcast)(?:-start)?\(")
_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')


def collectives(hlo: str) -> list[dict]:
    """Every collective of a compiled HLO module: op, result type and the jax op_name it was inserted for
    ("" when the partitioner left no metadata)."""
    out = []
    for line in hlo.splitlines():
        m = _HLO_COLLECTIVE.search(line)
        if m:
            name = _OP_NAME.search(line)
            out.append({"op": m.group("op"), "type": m.group("type"), "op_name": name.group("name") if name else ""})
    return out


def shard_map_collectives(hlo: str) -> list[dict]:
    """The collectives the partitioner put at a shard_map's boundary or inside its body (their op_name names
    the shard_map): the re-layouts of q/k/v/dt/masks a kernel call would cost. A DMA kernel's body needs none."""
    return [c for c in collectives(hlo) if "shard_map" in c["op_name"]]
