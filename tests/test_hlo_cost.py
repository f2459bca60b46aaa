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
