"""Triton tiles for the GPU DMA kernels: one table, read by `dma_pallas_gpu` and printed by the GPU benchmark.

A tile is `rows` query rows (block_q query positions × the R = N/K heads of one kv head) by `block_k` keys; every
kernel of a call (forward, dQ, dK/dV) uses the same tiles, since the sparse walk's plan is built for one tiling.
The walk decides the entry: "dense" (every causal key block, T < 2·keep_window_size or the top-k inactive) and
"sparse" (long context: the keys the top-k can keep).

Measured on one NVIDIA H200 (jax 0.11.2, triton 3.6.0, 2026-12-04; `benchmarks/gpu_check_dma.py --sections
tiles`), bf16, head dim 128, fwd+bwd through the profiler, each kernel timed on its own (the tiles of that day):

    dense  (T = 2k, B = 16, N/K = 6/3): 64×64 8 warps (the old default) 4.24 ms → 64×64 4 warps 2.32 ms
           (forward 0.99 → 0.48, dQ 0.98 → 0.43, dK/dV 1.72 → 0.89 ms); 128-row and 128-key tiles were slower.
    sparse (T = 16k, B = 1, N/K = 8/2, w = 2048): 64×64 8 warps 9.50 ms → 128×32 4 warps 3 stages 4.07 ms
           (dK/dV 4.88 → 1.56 ms: its grid runs over key tiles, and 32-key tiles give it 4× the programs).

At head dim 128, 8 warps split each 64-row tile's matmuls into thin slices; 4 warps were faster in every kernel.

Then compiled for sm_90 on a CPU host (`benchmarks/gpu_compile_table.py`, triton 3.6.0 + its ptxas, 2026-12): the
measured head-dim-128 tiles spill registers (the dK/dV kernel 0.8-1.3 KB per thread at 64×64 with 4 warps, every
sparse-walk kernel 1.1-1.9 KB at 128×32 with 4 warps), and the spill-free alternatives the compile check found
were slower where the H200 timed them (dK/dV at 64×64 with 8 warps: 1.72 ms against 0.89). Timing on the GPU
decides: those two entries keep their measured tiles and carry `spills_measured`, the spill bytes per thread the
compile check then accepts for exactly those tiles (any growth still fails it). Head dims 64 and 256 take the
spill-free tiles the compile check found (unmeasured on a GPU): 64×32 with 8 warps for dK/dV at 64, 32×32 at 256.
Spill-free head-128 alternatives to time next: 64×32 with 8 dK/dV warps (dense), 128×32 with 8 warps (sparse).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tiles:
    rows: int  # query rows per tile: block_q positions × R heads
    block_k: int  # keys per tile
    num_warps: int  # forward and dQ kernels
    num_stages: int
    dkv_warps: int | None = None  # the dK/dV kernel's, when it needs more (None: num_warps)
    spills_measured: int = 0  # spill bytes per thread accepted at these tiles: they were timed fastest on a GPU

    def block_q(self, heads_per_kv: int) -> int:
        """Query positions per tile (at least 1: R larger than `rows` gives one position of R rows)."""
        return max(1, self.rows // heads_per_kv)


# (head dim, walk) → tiles. Lookups fall back to the nearest head dim's row of the same walk.
TABLE: dict[tuple[int, str], Tiles] = {
    (64, "dense"): Tiles(rows=64, block_k=32, num_warps=4, num_stages=2, dkv_warps=8),
    (64, "sparse"): Tiles(rows=64, block_k=32, num_warps=4, num_stages=2, dkv_warps=8),
    (128, "dense"): Tiles(rows=64, block_k=64, num_warps=4, num_stages=2, spills_measured=1536),  # H200: 2.32 ms
    (128, "sparse"): Tiles(rows=128, block_k=32, num_warps=4, num_stages=3, spills_measured=2048),  # H200: 4.07
    (256, "dense"): Tiles(rows=32, block_k=32, num_warps=4, num_stages=2, dkv_warps=8),
    (256, "sparse"): Tiles(rows=32, block_k=32, num_warps=4, num_stages=2, dkv_warps=8),
}


def choose(head_dim: int, *, sparse: bool) -> Tiles:
    """The table's tiles for this head dim and walk (the nearest measured head dim at or above, else the largest)."""
    walk = "sparse" if sparse else "dense"
    dims = sorted(h for h, w in TABLE if w == walk)
    return TABLE[next((h for h in dims if h >= head_dim), dims[-1]), walk]
