"""benchmarks/hlo_cost.py counts a compiled program's FLOPs with every loop run as often as it runs.

A scan of N matmuls compiled for this CPU: the whole-program FLOPs are N × the body's (2·m·k·n per matmul, plus
its elementwise ops), the body counted once is what compiled.cost_analysis() reports (XLA counts a while body
once), and nested loops multiply. Fresh random operands, shapes that are not powers of two.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import hlo_cost  # noqa: E402

M, K, N, STEPS, OUTER = 24, 40, 56, 7, 3


def _compiled(f, *args):
    return jax.jit(f).lower(*args).compile()


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.fixture
def operands():
    kx, kw = jax.random.split(jax.random.PRNGKey(3))
    return jax.random.normal(kx, (M, K)), jax.random.normal(kw, (STEPS, K, N))


def test_scan_counts_every_iteration(operands):
    x, ws = operands

    def f(x, ws):
        def body(acc, w):
            return acc + jnp.tanh(x @ w), None

        return jax.lax.scan(body, jnp.zeros((M, N)), ws)[0]

    compiled = _compiled(f, x, ws)
    module = hlo_cost.parse(compiled.as_text())
    ops = hlo_cost.op_costs(module)
    step, once = hlo_cost.totals(ops), hlo_cost.totals(ops, once=True)
    assert [trip for _, trip, _ in hlo_cost.loops(module)] == [STEPS]
    matmul = 2.0 * M * K * N
    assert step["matmul_flops"] == pytest.approx(STEPS * matmul)
    assert once["matmul_flops"] == pytest.approx(matmul)
    assert step["transcendentals"] == pytest.approx(STEPS * M * N)  # the tanh
    # the body once is XLA's own count (its loop counter and the add are the few FLOPs around the matmul)
    assert once["flops"] == pytest.approx(_xla_flops(compiled), rel=0.05)
    assert step["flops"] > 0.99 * STEPS * once["flops"] - STEPS * 10
    assert step["bytes"] > STEPS * 4 * (M * K + K * N)  # each iteration reads its x and w


def test_nested_loops_multiply(operands):
    x, ws = operands

    def f(x, ws):
        def inner(acc, w):
            return acc + x @ w, None

        def outer(acc, _):
            return jax.lax.scan(inner, acc, ws)[0] * 0.5, None

        return jax.lax.scan(outer, jnp.zeros((M, N)), None, length=OUTER)[0]

    ops = hlo_cost.op_costs(hlo_cost.parse(_compiled(f, x, ws).as_text()))
    assert hlo_cost.totals(ops)["matmul_flops"] == pytest.approx(OUTER * STEPS * 2.0 * M * K * N)


def test_unreadable_trip_count_raises():
    def f(x):
        return jax.lax.while_loop(lambda c: c[0].sum() < 100.0, lambda c: (c[0] * 1.5 + 1.0,), (x,))[0]

    module = hlo_cost.parse(_compiled(f, jnp.ones((5,))).as_text())
    with pytest.raises(ValueError, match="trip count"):
        hlo_cost.op_costs(module)


def test_each_op_names_the_python_line_it_came_from(operands):
    """The op's source line is read from the frame table jax writes after the module (or from source_file /
    source_line on older jax): the ops below are costed at this file's lines (XLA:CPU may fuse the tanh into the
    dot's fusion, whose metadata is then one of the two lines), and the matmul is a matmul."""
    x, ws = operands

    def f(x, w):
        y = x @ w
        return jnp.tanh(y)  # THE TANH LINE

    ops = hlo_cost.op_costs(hlo_cost.parse(_compiled(f, x, ws[0]).as_text()))
    line = next(i for i, text in enumerate(open(__file__), 1) if "THE TANH LINE" in text and "next(" not in text)
    sources = {o.source for o in ops if o.flops}
    assert sources & {f"test_hlo_cost.py:{line - 1}", f"test_hlo_cost.py:{line}"}, sources
    assert any(o.matmul and o.flops == 2 * M * K * N for o in ops), ops


def test_hbm_bytes_leave_out_on_chip_arrays_and_slices_read_their_result():
    """A TPU-style module: an async slice prefetches part of an HBM array into VMEM (S(1)) and a fusion reads it
    there; only the slice's read of HBM and the fusion's HBM output count, and AllocateBuffer moves nothing."""
    text = """HloModule m

%fused (p: f32[2,128]) -> f32[2,128] {
  %p = f32[2,128]{1,0:T(8,128)S(1)} parameter(0)
  ROOT %e = f32[2,128]{1,0:T(8,128)} exponential(%p)
}

ENTRY %main (x: f32[8,128]) -> f32[2,128] {
  %x = f32[8,128]{1,0:T(8,128)} parameter(0)
  %buf = f32[64,128]{1,0:T(8,128)} custom-call(), custom_call_target="AllocateBuffer"
  %s = ((f32[8,128]{1,0:T(8,128)}), f32[2,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%x), slice={[0:2], [0:128]}
  %d = f32[2,128]{1,0:T(8,128)S(1)} slice-done(%s)
  ROOT %f = f32[2,128]{1,0:T(8,128)} fusion(%d), kind=kLoop, calls=%fused
}
"""
    ops = {o.name: o for o in hlo_cost.op_costs(hlo_cost.parse(text))}
    row = 2 * 128 * 4
    assert ops["s"].bytes == row  # read 2 rows of x from HBM, written to VMEM
    assert ops["d"].bytes == 0 and ops["buf"].bytes == 0
    assert ops["f"].bytes == row  # reads VMEM (free), writes its HBM result
    assert ops["f"].transcendentals == 2 * 128
    assert hlo_cost.hbm_bytes("(f32[8,128]{1,0}, bf16[4]{0:S(1)})") == 8 * 128 * 4
