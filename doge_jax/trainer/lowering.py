"""The full sharded train step, lowered for a platform this host may not have, and what its module holds.

    step, state, batch = abstract_train_step(config, mesh)          # ShapeDtypeStructs with shardings
    text = lower_train_step(config, mesh, "tpu")                      # StableHLO, nothing allocated or compiled
    report = kernel_report(text)                                      # the kernel calls and where they sit

The step is the trainer's own (`make_train_step`, jitted with the state/batch shardings `Trainer._setup` uses,
traced under `jax.set_mesh`), so what lowers here is what a run on that mesh would compile. Lowering for a GPU or
TPU from a CPU host runs inside `doge_jax.kernels.target.lowering_for(platform)`, so that the kernels emit their
real custom calls rather than interpret mode. The checks read the StableHLO text, which is partitioned only
later (by the target's compiler), so "where a kernel sits" means: inside an `sdy.manual_computation` (the
shard_map) whose operands are split as the per-shard kernel expects.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from doge_jax.kernels import target
from doge_jax.model import decoder as model_lib
from doge_jax.parallel import sharding as sh
from doge_jax.trainer import optim, step as step_lib, validate
from doge_jax.trainer.batches import microbatch_sharding

# The custom-call targets of the Pallas kernels, by platform.
KERNEL_TARGETS = {"cuda": ("__gpu$xla.gpu.triton",), "tpu": ("tpu_custom_call",)}
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "collective_permute",
               "collective_broadcast")


def abstract_train_step(config, mesh):
    """(jitted train step, abstract state, abstract batch) of `config` on `mesh`, shardings as the Trainer's.

    The batch is one micro-batch per step ([1, batch_size, seq_len] int32 ids/targets/segments/positions)."""
    model_cfg = validate.model_config(config.model)
    model = model_lib.abstract_model(model_cfg)
    model.train()
    graphdef, abstract_params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(nnx.to_pure_dict(rest)):
        raise ValueError("abstract_train_step: a model with dropout RNG state is not supported here "
                         "(config.model.attention_dropout / hidden_dropout must be 0)")
    replicated = NamedSharding(mesh, P())
    param_sharding = nnx.to_pure_dict(sh.state_shardings(abstract_params, mesh))
    params = nnx.to_pure_dict(abstract_params)
    tx, schedule = optim.make_optimizer(config)
    opt = jax.eval_shape(tx.init, params)
    opt_sharding = optax.tree_map_params(tx, lambda _, s: s, opt, param_sharding,
                                         transform_non_params=lambda _: replicated)
    state_sharding = {"params": param_sharding, "opt_state": opt_sharding, "step": replicated, "rng": replicated}
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": key_data}
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
    rows_sharding = microbatch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct((1, config.batch_size, config.seq_len), jnp.int32, sharding=rows_sharding)
             for name in ("input_ids", "targets", "segment_ids", "positions")}
    loss_fn = functools.partial(step_lib.pretrain_loss, z_loss_coef=config.z_loss_coef)
    train_step = step_lib.make_train_step(graphdef, {}, tx, schedule, loss_fn)
    jitted = jax.jit(train_step, in_shardings=(state_sharding, rows_sharding),
                     out_shardings=(state_sharding, replicated), donate_argnums=0)
    return jitted, state, batch


def lower_train_step(config, mesh, platform: str) -> str:
    """The StableHLO text of `config`'s sharded train step on `mesh`, lowered for `platform` ('cuda', 'tpu',
    'cpu'), with the kernels traced for that platform. Allocates nothing and compiles nothing."""
    with target.lowering_for(platform), jax.set_mesh(mesh):
        step, state, batch = abstract_train_step(config, mesh)
        lowered = step.trace(state, batch).lower(lowering_platforms=(platform,))
    return lowered.as_text()


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


def kernel_report(text: str, platform: str) -> KernelReport:
    """Every kernel custom call of `platform` in the StableHLO `text`, with its enclosing manual region.

    Regions are tracked by indentation-independent brace depth: a manual_computation's body opens with `{` at
    the end of its line and closes with the `}` that returns to that depth."""
    targets = KERNEL_TARGETS[platform]
    calls, ins = [], []
    stack: list[tuple[int, tuple[str, ...]]] = []  # (brace depth at which the region's body ends, manual axes)
    depth = 0
    collectives = {c: 0 for c in COLLECTIVES}
    for line in text.splitlines():
        manual = _MANUAL_OPEN.search(line)
        if manual:
            axes = tuple(a.strip().strip('"') for a in manual.group("axes").split(",") if a.strip())
            stack.append((depth, axes))
            ins.append(manual.group("ins"))
        for c in COLLECTIVES:
            if f"stablehlo.{c}" in line or f'"stablehlo.{c}"' in line:
                collectives[c] += 1
        call = _CALL.search(line)
        if call and call.group("target") in targets:
            types = line[line.rfind(": (") + 3:line.rfind(") ->")] if ": (" in line else ""
            calls.append(KernelCall(name=_kernel_name(line), operand_shapes=re.findall(r"tensor<[^>]*>", types),
                                    manual_axes=stack[-1][1] if stack else None))
        code = _STRING.sub('""', line)  # a kernel's serialized IR may hold unbalanced braces
        depth += code.count("{") - code.count("}")
        while stack and depth <= stack[-1][0]:
            stack.pop()
    return KernelReport(calls=calls, manual_regions=len(ins), region_in_shardings=ins,
                        collectives={c: n for c, n in collectives.items() if n})


def compile_on_host(config, mesh) -> str:
    """The compiled (partitioned) HLO text of the same sharded step for this host's devices, kernels in
    interpret mode: what the SPMD partitioner inserts around each shard_map is decided before any backend
    code, so the collectives read here are those a GPU/TPU compile inserts around the kernel calls."""
    with jax.set_mesh(mesh):
        step, state, batch = abstract_train_step(config, mesh)
        return step.trace(state, batch).lower().compile().as_text()


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
