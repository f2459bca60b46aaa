"""The int8 LM head's leading logits, recomputed in float32: greedy picks what a float32 head picks.

An int8 head moves every logit a little, and where float32's two best tokens are closer than that, the argmax
flips. On a tiny Doge trained on stdlib prose (bench_serve.py's quality set, 2,048 positions) the w8a16 head
caused half of the int8 model's top-1 disagreements with float32 (31 flips with every linear int8, 16 with the
head float32): mostly its output, rounded to bfloat16 (a step of 1/32 at a logit of 5). The head is one matmul
bound by its bytes (Doge-20M: 32768 x 256, 8 MB in int8 against 32 MB in float32), and only a few of its logits
can be the maximum, so: run the int8 head, bound its error for each row, and recompute in float32 every logit
within twice that bound of the row's maximum.

The bound is rigorous for the kernels of `quantize.py`. A logit is x . w_j over I inputs; the kernel computes
x~ . w~_j, with w~_j = q_j s_j the dequantised row and x~ the input as the kernel rounds it. By Cauchy-Schwarz,

    |x . w_j - x~ . w~_j| <= |x - x~| |w~_j| + |x| |w_j - w~_j| + (float32 accumulation) + (output rounding)
                          <= |x - x~| W2 + |x| R2 + I 2^-23 |x| W2 + eps_y |y|        (= A + eps_y |y|)

with |.| the Euclidean norm, W2 the largest |w~_j| and R2 the largest |w_j - w~_j| (the quantisation residual,
measured when the head is set up). w8a16 rounds x to bfloat16 (|x - x~| <= 2^-7 |x|: twice bfloat16's
half-ulp of 2^-9, and as much again for a kernel that would also round q s to bfloat16) and its output to
bfloat16 (eps_y = 2^-8, twice the half-ulp); w8a8 rounds each x_i / max|x| to a grid of step 2 / 255, so |x - x~| <=
sqrt(I) max|x| 2 / 255 (a whole step each), and its int32 sums are exact (eps_y = 0). The accumulation term
doubles I 2^-24.

If j* is float32's argmax and m the int8 argmax (at `top`), both within the outputs that matter: y~[j*] >= top -
2E with E = A + k (|top| + A), k = eps_y / (1 - eps_y) (the output rounding is relative, and |y| <= |top| + A
for those two). So j* is among the logits >= top - 2E, and once those hold their float32 values every other
logit (< top - 2E <= y[m] - E <= y[j*]) is below float32's maximum: the argmax is float32's, up to float32
summation order (ties within ~1e-6 relative may break differently from F.linear), and the candidates' logits,
which carry the probability mass a sampler draws from, are float32's too.

The float32 rows are the tied embedding's (already held for token lookups: no extra memory) or, for an untied
head, its float32 weight kept beside the int8 copy (4 bytes a weight of RAM, a few rows read a step).

Cost: the decode step runs this after streaming every weight through the cache, where each NumPy or torch call
costs 5-20 us instead of ~1 (measured inside Doge-20M's int8 step on the 2-core EPYC). So it is a handful of
calls, in NumPy on views of the same memory, with Python floats for a lone row: one max and one compare over the
row, one norm of x, one gather and product for the candidates. What it costs a step: serve/README.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# eps_x (|x - x~| per unit of |x| for w8a16, of sqrt(I) max|x| for w8a8) and eps_y (the output's relative
# rounding) of each int8 kernel (see the module docstring)
ROUNDING = {"w8a16": (2.0 ** -7, 2.0 ** -8), "w8a8": (2.0 / 255.0, 0.0)}
CHUNK = 128  # columns per maximum when several rows are rescored


def weight_stats(weight: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> tuple[float, float]:
    """(W2, R2) of float32 weight [O, I] quantised to int8 qweight [O, I] with scales [O]: the largest Euclidean
    norm of a dequantised row, and of a row's residual w - q s. In float64, a block of rows at a time: the whole
    head at once held two float64 copies (Doge-60M: 268 MB) at start-up."""
    w2 = r2 = 0.0
    for start in range(0, qweight.shape[0], 4096):
        rows = slice(start, start + 4096)
        dequantized = qweight[rows].double() * scales[rows].double()[:, None]
        w2 = max(w2, float(torch.linalg.vector_norm(dequantized, dim=1).max()))
        r2 = max(r2, float(torch.linalg.vector_norm(weight[rows].double() - dequantized, dim=1).max()))
    return w2, r2


def slack(x: np.ndarray, kernel: str, w2: float, r2: float) -> np.ndarray:
    """x [M, I] float32 -> A [M, 1]: the bound on every output's error, output rounding aside."""
    eps_x, _ = ROUNDING[kernel]
    inputs = x.shape[1]
    norm = np.sqrt(np.einsum("mi,mi->m", x, x, dtype=np.float64))[:, None]  # |x| [M, 1]
    if kernel == "w8a8":
        rounding = math.sqrt(inputs) * eps_x * np.abs(x).max(axis=1, keepdims=True)
    else:
        rounding = eps_x * norm
    return rounding * w2 + norm * (r2 + inputs * 2.0 ** -23 * w2)


def rescore_(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel: str, w2: float, r2: float) -> int:
    """In place: every output of y [M, V] (x [M, I] through `kernel`; both contiguous float32) at or above its
    row's floor top - 2E (the module docstring) becomes x W^T's, computed in float32 from weight [V, I] (row-major:
    its rows are gathered). Returns how many were recomputed.

    One row (a lone stream's step) is one max and one compare over the row with Python floats for its scalars.
    Several rows go through each CHUNK columns' maximum instead (one vectorised pass in torch, as
    `sampling.argmax_rows` does), so that only the few chunks reaching the floor are compared element by element:
    NumPy's `nonzero` over 8 rows of 32,768 took ~0.5 ms inside a decode step."""
    _, eps_y = ROUNDING[kernel]
    k = eps_y / (1.0 - eps_y)
    M, V = y.shape
    yn, xn, wn = y.numpy(), x.numpy(), weight.numpy()
    a = slack(xn, kernel, w2, r2)  # [M, 1]
    if M == 1:
        row, top, a = yn[0], float(yn.max()), float(a[0, 0])
        cols = np.flatnonzero(row >= top - 2 * (a + k * (abs(top) + a)))
        row[cols] = wn[cols] @ xn[0]
        return len(cols)
    main = V - V % CHUNK
    chunk_max = y[:, :main].view(M, main // CHUNK, CHUNK).amax(dim=2).numpy()  # [M, C]
    top = chunk_max.max(axis=1, keepdims=True)  # [M, 1]
    if main < V:
        top = np.maximum(top, yn[:, main:].max(axis=1, keepdims=True))
    low = top - 2 * (a + k * (np.abs(top) + a))  # [M, 1]
    r, c = np.nonzero(chunk_max >= low)  # the chunks holding candidates
    kr, kc = np.nonzero(yn[:, :main].reshape(M, main // CHUNK, CHUNK)[r, c] >= low[r])  # [k, CHUNK] -> members
    rows, cols = r[kr], c[kr] * CHUNK + kc
    if main < V:
        tr, tc = np.nonzero(yn[:, main:] >= low)
        rows, cols = np.concatenate([rows, tr]), np.concatenate([cols, tc + main])
    yn[rows, cols] = np.einsum("ki,ki->k", wn[cols], xn[rows])
    return len(rows)
