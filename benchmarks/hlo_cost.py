"""FLOPs and bytes of a compiled XLA program, op by op, from its HLO text, with every loop counted as often as it runs.

    module = parse(compiled.as_text())
    ops = op_costs(module)            # one OpCost per top-level instruction: flops, bytes, times it runs, kind
    totals(ops)                       # {"flops", "bytes", "matmul_flops", ...}, loops included
    totals(ops, once=True)            # what compiled.cost_analysis() reports: every loop body counted once

Why: `compiled.cost_analysis()` gives one number per program and counts a while loop's body once (XLA's
HloCostAnalysis), so a train step with gradient accumulation (a scan over micro-batches) or the chunked loss (a scan
over chunks of positions) is undercounted by the trip counts, and it says nothing about which ops the bytes go to.
This reads the same compiled module and applies the same counting rules per instruction:

- FLOPs: a dot / convolution is 2 · output elements · the contracted size (its MACs); every other arithmetic op is
  1 per output element; a reduce is 1 per input element; transcendentals (exp, log, rsqrt, sine...) are counted
  apart, as XLA does. A fusion's FLOPs are those of the instructions inside it.
- Bytes: HBM bytes. Each top-level instruction reads its operands and writes its result (a fusion counts at its
  boundary, not inside), except that a slice reads only its result's size, and arrays a TPU layout places in
  on-chip memory (VMEM `S(1)`, SMEM `S(2)`) move no HBM bytes: XLA:TPU prefetches kernel and fusion operands into
  VMEM with async copies and slices, which are then the HBM traffic. An async op counts at its start;
  bookkeeping (parameter, tuple, get-tuple-element, bitcast, constant, AllocateBuffer) and the loop itself move
  nothing.
- Loops: a while body runs `trip` times and its condition `trip + 1`: the trip count XLA wrote in the loop's
  backend_config (`known_trip_count`, on CPU and GPU), else read from the condition (`i < constant`, i from 0,
  as every lax.scan/fori_loop lowers on TPU); nested loops multiply.
- Matmul: an instruction is "matmul" when it is or contains a dot/convolution (TPU fuses the dot with its producers
  and consumers into one "output fusion": its bytes are the matmul's reads and writes).

`totals(ops, once=True)` reproduces cost_analysis()'s FLOPs within 3-6 % on the TPU train steps of
this repository (tests/test_compile_tpu.py checks it), the evidence that its FLOP rules are XLA's. Its bytes are
not cost_analysis()'s: that counts every operand of every op, on-chip or not, and XLA's per-fusion operand
utilisation is not reproduced here; read them as HBM traffic split between ops, an estimate, not a measurement. Opaque custom calls (the
Mosaic kernels) carry no FLOPs here, as in cost_analysis.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1}
# Ops that touch no memory and compute nothing (or whose cost is their callee's).
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
        "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"}
TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "rsqrt", "sqrt", "cbrt", "power",
                  "tanh", "logistic", "sine", "cosine", "tan", "atan2", "erf"}
# Data movement inside a fusion: no arithmetic.
NO_FLOPS = FREE | {"broadcast", "reshape", "transpose", "slice", "dynamic-slice", "dynamic-update-slice", "pad",
                   "concatenate", "copy", "iota", "gather", "scatter", "reverse", "fusion", "custom-call",
                   "copy-start", "copy-done", "bitcast-convert", "sort", "rng-bit-generator"}
MATMUL = {"dot", "convolution"}
# TPU custom calls that reserve or reinterpret a buffer and move no bytes.
NO_TRAFFIC_CALLS = ("AllocateBuffer", "ConcatBitcast")
_SHAPE = re.compile(r"\b(pred|[sufc]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(?P<name>[\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s+(ROOT )?%(?P<name>[\w.\-]+) = (?P<rest>.*)$")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_SOURCE = re.compile(r'source_file="(?P<file>[^"]*)" source_line=(?P<line>\d+)')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_OPNAME = re.compile(r'op_name="(?P<op>[^"]*)"')


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result type as written (a tuple's elements inside parentheses)
    opcode: str
    operands: list[str]
    operand_text: str  # the operand list as written (a constant's value, a parameter's number)
    attrs: str  # everything after the operand list

    @property
    def param_number(self) -> int:
        return int(self.operand_text)

    @property
    def op_name(self) -> str:
        found = _OPNAME.search(self.attrs)
        return found.group("op") if found else ""


    def called(self, key: str) -> list[str]:
        """Computations named by attribute `key` (calls=, body=, condition=, to_apply=, branch_computations=)."""
        found = re.search(rf"\b{key}=(\{{[^}}]*\}}|%[\w.\-]+)", self.attrs)
        return re.findall(r"%([\w.\-]+)", found.group(1)) if found else []


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instr]]
    entry: str
    shapes: dict[tuple[str, str], str]  # (computation, instruction) → result type
    frames: dict[int, str] = dataclasses.field(default_factory=dict)  # stack frame id → "file.py:line"

    def instr(self, comp: str, name: str) -> Instr | None:
        return next((i for i in self.computations[comp] if i.name == name), None)

    def source(self, ins: Instr) -> str:
        """The Python line jax recorded for an op ("decoder.py:120"): its stack frame (newer jax writes a frame
        table after the module) or its source_file/source_line (older jax); "" when neither is there."""
        found = _FRAME.search(ins.attrs)
        if found:
            return self.frames.get(int(found.group(1)), "")
        found = _SOURCE.search(ins.attrs)
        return f"{found.group('file').rsplit('/', 1)[-1]}:{found.group('line')}" if found else ""


def _frames(tables: dict[str, list[str]]) -> dict[int, str]:
    """Stack frame id → "file.py:line" of the frame's own location, from the tables after the module."""
    def entries(name):
        for line in tables.get(name, []):
            key, _, value = line.partition(" ")
            yield int(key), value

    files = {k: v.strip('"').rsplit("/", 1)[-1] for k, v in entries("FileNames")}
    locations = {}
    for k, v in entries("FileLocations"):
        fields = dict(re.findall(r"(\w+)=(\d+)", v))
        locations[k] = f"{files.get(int(fields.get('file_name_id', 0)), '?')}:{fields.get('line', '?')}"
    return {k: locations.get(int(dict(re.findall(r"(\w+)=(\d+)", v)).get("file_location_id", 0)), "")
            for k, v in entries("StackFrames")}


def _split_type(rest: str) -> tuple[str, str]:
    """'TYPE opcode(...)...' → (TYPE, 'opcode(...)...'); TYPE may be a parenthesised tuple."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += (c == "(") - (c == ")")
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _split_call(text: str) -> tuple[str, str, str]:
    """'opcode(a, b), attrs' → (opcode, 'a, b', attrs)."""
    opcode, _, tail = text.partition("(")
    depth = 1
    for i, c in enumerate(tail):
        depth += (c == "(") - (c == ")")
        if depth == 0:
            return opcode.strip(), tail[:i], tail[i + 1:].lstrip(", ")
    return opcode.strip(), tail, ""


def parse(text: str) -> Module:
    computations: dict[str, list[Instr]] = {}
    tables: dict[str, list[str]] = {}
    entry, current, table = "", None, None
    for line in text.splitlines():
        if line in _TABLES:
            table = tables.setdefault(line, [])
            continue
        if table is not None:
            if line.strip():
                table.append(line.strip())
                continue
            table = None
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group("name")
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        found = _INSTR.match(line) if current else None
        if not found:
            continue
        shape, call = _split_type(found.group("rest"))
        opcode, operands, attrs = _split_call(call)
        computations[current].append(Instr(found.group("name"), shape, opcode,
                                           re.findall(r"%([\w.\-]+)", operands), operands, attrs))
    shapes = {(c, i.name): i.shape for c, instrs in computations.items() for i in instrs}
    return Module(computations, entry, shapes, _frames(tables))


def dims(shape: str) -> list[tuple[str, list[int]]]:
    return [(t, [int(d) for d in ds.split(",") if d]) for t, ds in _SHAPE.findall(shape.split("{")[0]
                                                                                   if not shape.startswith("(")
                                                                                   else shape)]


def nbytes(shape: str) -> float:
    total = 0.0
    for dtype, ds in dims(shape):
        n = 1
        for d in ds:
            n *= d
        total += n * DTYPE_BYTES.get(dtype, 4)
    return total


_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\](\{[^}]*\})?")
# Memory spaces in a TPU layout ("{2,1,0:T(8,128)S(1)}"): S(1) is VMEM, S(2) SMEM; none or S(0) is HBM.
_ON_CHIP = re.compile(r"S\([12]\)")


def hbm_bytes(shape: str) -> float:
    """Bytes of the arrays in a type (a tuple's too) that live in HBM: those laid out in VMEM or SMEM (a TPU
    layout's S(1) / S(2)) count nothing; everything counts on CPU and GPU, whose layouts name no memory space."""
    total = 0.0
    for dtype, ds, layout in _ARRAY.findall(shape):
        if layout and _ON_CHIP.search(layout):
            continue
        n = 1
        for d in ds.split(","):
            n *= int(d) if d else 1
        total += n * DTYPE_BYTES.get(dtype, 4)
    return total


def _tuple_element(shape: str, index: int) -> str:
    """The `index`-th top-level element of a tuple type, as written (layout included)."""
    depth, start, parts = 0, 1, []
    for i, c in enumerate(shape):
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        if (c == "," and depth == 1) or (c == ")" and depth == 0):
            parts.append(shape[start:i].strip())
            start = i + 1
    return parts[index] if index < len(parts) else ""


def elements(shape: str) -> int:
    n_all = 0
    for _, ds in dims(shape):
        n = 1
        for d in ds:
            n *= d
        n_all += n
    return n_all


def _window(attrs: str) -> dict[str, list]:
    """A convolution's window attribute per spatial dimension: size, stride, pad (lo, hi), lhs/rhs dilation."""
    found = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(part.split("=", 1) for part in (found.group(1).split() if found else []))
    n = len(fields["size"].split("x")) if "size" in fields else 0

    def ints(key, default):
        return [int(x) for x in fields[key].split("x")] if key in fields else [default] * n

    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else [(0, 0)] * n
    return dict(size=ints("size", 1), stride=ints("stride", 1), pad=pads, lhs_dilate=ints("lhs_dilate", 1),
                rhs_dilate=ints("rhs_dilate", 1))


def _valid_taps(in_size: int, out_size: int, size: int, stride: int, pad_lo: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """(output, kernel) position pairs of one spatial dimension that land on an input element (not on padding or a
    dilation hole): the count XLA's convolution FLOPs use. A batch dimension written as a dilated spatial one (how
    XLA:TPU expresses batched matmuls) has one such pair per output position."""
    last = (in_size - 1) * lhs_dilate
    n = 0
    for o in range(out_size):
        for k in range(size):
            p = o * stride + k * rhs_dilate - pad_lo
            n += 0 <= p <= last and p % lhs_dilate == 0
    return n


def _matmul_flops(module: Module, comp: str, ins: Instr) -> float:
    """2 · multiply-adds of a dot or convolution. Dot: output elements × the contracted size. Convolution: output
    batch × output features × the rhs's input features × the valid window taps of every spatial dimension."""
    out_dims = dims(ins.shape)[0][1]
    lhs_dims = dims(module.shapes.get((comp, ins.operands[0]), ""))[0][1]
    rhs_dims = dims(module.shapes.get((comp, ins.operands[1]), ""))[0][1]
    out = 1
    for d in out_dims:
        out *= d
    if ins.opcode == "dot":
        contract = re.search(r"rhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        k = 1
        for d in (contract.group(1).split(",") if contract and contract.group(1) else []):
            k *= rhs_dims[int(d)]
        return 2.0 * out * k
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    lhs_l, rhs_l, out_l = labels.groups()
    win = _window(ins.attrs)
    macs = out_dims[out_l.index("b")] * out_dims[out_l.index("f")] * rhs_dims[rhs_l.index("i")]
    for d in range(len(win["size"])):
        macs *= _valid_taps(lhs_dims[lhs_l.index(str(d))], out_dims[out_l.index(str(d))], win["size"][d],
                            win["stride"][d], win["pad"][d][0], win["lhs_dilate"][d], win["rhs_dilate"][d])
    return 2.0 * macs


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    matmul_flops: float = 0.0
    transcendentals: float = 0.0

    def __iadd__(self, other: "Cost") -> "Cost":
        self.flops += other.flops
        self.matmul_flops += other.matmul_flops
        self.transcendentals += other.transcendentals
        return self


def _inner_cost(module: Module, comp: str, memo: dict) -> Cost:
    """The arithmetic of a fused (or reducer) computation, nested fusions included, per execution."""
    if comp in memo:
        return memo[comp]
    cost = Cost()
    for ins in module.computations[comp]:
        cost += _instr_arith(module, comp, ins, memo)
    memo[comp] = cost
    return cost


def _instr_arith(module: Module, comp: str, ins: Instr, memo: dict) -> Cost:
    op = ins.opcode
    if op == "fusion":
        return _inner_cost(module, ins.called("calls")[0], memo)
    if op in MATMUL:
        f = _matmul_flops(module, comp, ins)
        return Cost(flops=f, matmul_flops=f)
    if op in ("reduce", "reduce-window", "all-reduce", "all-reduce-start", "reduce-scatter"):
        operands = [module.shapes.get((comp, o), "") for o in ins.operands]
        n_in = sum(elements(s) for s in operands[:max(1, len(operands) // 2)])
        reducer = _inner_cost(module, ins.called("to_apply")[0], memo) if ins.called("to_apply") else Cost(1.0)
        return Cost(flops=n_in * max(reducer.flops, 1.0))
    if op in TRANSCENDENTAL:
        return Cost(transcendentals=float(elements(ins.shape)))
    if op in NO_FLOPS or op.endswith(("-start", "-done")) or op.startswith(("all-", "collective-")):
        return Cost()
    return Cost(flops=float(elements(ins.shape)))


def _fusion_has_matmul(module: Module, comp: str) -> bool:
    for ins in module.computations[comp]:
        if ins.opcode in MATMUL or (ins.opcode == "fusion" and _fusion_has_matmul(module, ins.called("calls")[0])):
            return True
    return False


def _param_reads(module: Module, fused: str) -> dict[int, float | None]:
    """Per parameter number of a fused computation: the bytes read when only part of it is (slices and
    dynamic-slices read their result's size; the in-place buffer of a dynamic-update-slice is not read), None
    when it is read whole."""
    body = module.computations[fused]
    users: dict[str, list[Instr]] = defaultdict(list)
    for i in body:
        for o in i.operands:
            users[o].append(i)
    reads: dict[int, float | None] = {}
    for p in body:
        if p.opcode != "parameter":
            continue
        part = 0.0
        for u in users.get(p.name, []):
            if u.opcode in ("slice", "dynamic-slice") and u.operands[0] == p.name:
                part += nbytes(u.shape)
            elif u.opcode == "dynamic-update-slice" and u.operands[0] == p.name:
                continue
            else:
                part = None
                break
        reads[p.param_number] = part
    return reads


def _fusion_write(module: Module, fused: str, shape: str) -> float:
    """Bytes a fusion writes: its result, except that an in-place dynamic-update-slice at the root writes only
    the update."""
    root = module.computations[fused][-1] if module.computations[fused] else None
    roots = [root] if root and root.opcode != "tuple" else [module.instr(fused, o) for o in (root.operands if root
                                                                                               else [])]
    if roots and all(r is not None and r.opcode == "dynamic-update-slice" for r in roots):
        return sum(nbytes(module.shapes[(fused, r.operands[1])]) for r in roots)
    return hbm_bytes(shape)


def _bytes(module: Module, comp: str, ins: Instr) -> float:
    """HBM bytes a top-level instruction reads and writes (HloCostAnalysis' rule, operands + result, with three
    refinements: a slice reads only its result's size; arrays in a TPU's on-chip memory (VMEM / SMEM) move no HBM
    bytes, so a prefetch into VMEM (an async slice or copy) costs its read only; an async op counts at its start)."""
    if ins.opcode in FREE or ins.opcode.endswith("-done"):
        return 0.0
    if ins.opcode == "custom-call" and any(f'custom_call_target="{t}"' in ins.attrs for t in NO_TRAFFIC_CALLS):
        return 0.0
    if ins.opcode == "fusion":
        fused = ins.called("calls")[0]
        reads = _param_reads(module, fused)
        read = 0.0
        for n, operand in enumerate(ins.operands):
            full = hbm_bytes(module.shapes.get((comp, operand), ""))
            part = reads.get(n)
            read += full if part is None or full == 0 else min(full, part)
        return read + _fusion_write(module, fused, ins.shape)
    # An async op's type is (operands, result, context...): what it writes is the second element.
    result = _tuple_element(ins.shape, 1) if ins.opcode.endswith("-start") else ins.shape
    if ins.opcode in ("slice", "dynamic-slice", "slice-start", "dynamic-slice-start") and ins.operands:
        source_in_hbm = hbm_bytes(module.shapes.get((comp, ins.operands[0]), "")) > 0
        return (nbytes(result.split("{")[0]) if source_in_hbm else 0.0) + hbm_bytes(result)
    read = sum(hbm_bytes(module.shapes.get((comp, o), "")) for o in ins.operands)
    return read + hbm_bytes(result)


def _known_trip(ins: Instr) -> int | None:
    """The trip count XLA itself derived, where it wrote it in the while's backend_config (CPU and GPU do)."""
    found = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
    return int(found.group(1)) if found else None


def trip_count(module: Module, condition: str) -> int | None:
    """Iterations of a while loop from its condition `i < N` (i a loop counter from 0, as lax.scan lowers), or
    None if the condition is not of that form."""
    instrs = module.computations[condition]
    root = instrs[-1]
    if root.opcode != "compare" or "direction=LT" not in root.attrs:
        return None
    for operand in root.operands[1:]:
        const = module.instr(condition, operand)
        if const is not None and const.opcode == "constant":
            found = re.fullmatch(r"\s*(-?\d+)\s*", const.operand_text)
            if found:
                return int(found.group(1))
    return None


@dataclasses.dataclass
class OpCost:
    computation: str
    name: str
    opcode: str
    op_name: str  # jax's op_name metadata: the source op (e.g. ".../jvp(...)/dot_general")
    times: int  # executions per program run (the product of the enclosing loops' trip counts)
    flops: float  # per execution
    transcendentals: float
    bytes: float
    matmul: bool  # a dot/convolution or a fusion holding one
    target: str = ""  # a custom call's target (e.g. "tpu_custom_call": a Mosaic kernel)
    source: str = ""  # the Python line jax recorded ("decoder.py:120")

    @property
    def total_flops(self) -> float:
        return self.flops * self.times

    @property
    def total_bytes(self) -> float:
        return self.bytes * self.times


def op_costs(module: Module) -> list[OpCost]:
    """Every top-level instruction of the entry computation and, recursively, of the loop bodies, calls and
    branches it runs, with how many times it runs. Raises if a loop's trip count cannot be read."""
    memo: dict = {}
    out: list[OpCost] = []

    def walk(comp: str, times: int) -> None:
        for ins in module.computations[comp]:
            if ins.opcode == "while":
                (body,), (cond,) = ins.called("body"), ins.called("condition")
                trip = _known_trip(ins) or trip_count(module, cond)
                if trip is None:
                    raise ValueError(f"while loop {ins.name}: trip count not readable from its condition {cond}")
                walk(cond, times * (trip + 1))
                walk(body, times * trip)
                continue
            if ins.opcode in ("call", "conditional"):
                for callee in ins.called("to_apply") + ins.called("branch_computations"):
                    walk(callee, times)  # a branch is counted as if taken: none in a train step
                continue
            arith = _instr_arith(module, comp, ins, memo)
            is_mm = ins.opcode in MATMUL or (ins.opcode == "fusion" and
                                            _fusion_has_matmul(module, ins.called("calls")[0]))
            target = _TARGET.search(ins.attrs) if ins.opcode == "custom-call" else None
            out.append(OpCost(comp, ins.name, ins.opcode, ins.op_name, times, arith.flops, arith.transcendentals,
                              _bytes(module, comp, ins), is_mm, target.group(1) if target else "", module.source(ins)))

    walk(module.entry, 1)
    return out


def loops(module: Module) -> list[tuple[str, int, int]]:
    """(while instruction, trip count, times the loop itself is entered) for every loop the entry runs."""
    found: list[tuple[str, int, int]] = []

    def walk(comp: str, times: int) -> None:
        for ins in module.computations[comp]:
            if ins.opcode == "while":
                trip = _known_trip(ins) or trip_count(module, ins.called("condition")[0])
                found.append((ins.name, trip, times))
                walk(ins.called("body")[0], times * (trip or 1))
            elif ins.opcode in ("call", "conditional"):
                for callee in ins.called("to_apply") + ins.called("branch_computations"):
                    walk(callee, times)

    walk(module.entry, 1)
    return found


def totals(ops: list[OpCost], *, once: bool = False) -> dict[str, float]:
    """Sums over `ops`: flops, matmul_flops, transcendentals, bytes, matmul_bytes; `once`: every op counted once
    (a loop body as cost_analysis() counts it)."""
    t = defaultdict(float)
    for o in ops:
        n = 1 if once else o.times
        t["flops"] += o.flops * n
        t["transcendentals"] += o.transcendentals * n
        t["bytes"] += o.bytes * n
        if o.matmul:
            t["matmul_flops"] += o.flops * n
            t["matmul_bytes"] += o.bytes * n
    return dict(t)
