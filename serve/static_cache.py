"""A KV cache with fixed batch slots: requests join a free slot after their prefill and leave it when done.

Slot s holds one sequence with no padding: cache column j is position j, so a row's next position is its length.
Keys, values and each key's DMA bias `dt` are preallocated per layer as [slots, K, capacity, H] (`dt`: [slots, K,
capacity]; [slots, N, capacity] in the first SmallDoge layout, whose bias is per attention head). A `dt` column
that holds no key of its slot's sequence holds the dtype minimum (transformers' masked bias), so the cached
biases are the DMA mask as they stand and the step reads them without masking. The capacity
grows in `CHUNK`-column steps up to the context length, so memory follows the longest live sequence, not the
worst case, and always holds one column more than the keys it was grown for: a step's key length S is then never
the tensors' full width, so the view it reads never switches between contiguous and strided, which a compiled step
(`--compile`) guards on: at S == capacity (256 keys, say) it recompiled mid-request, ~a minute on 2 cores. A
decode step runs the slots 0..h-1 (h = highest slot in use + 1; a joining request takes the lowest free slot, so
that prefix stays short) over the key columns 0..S-1 (S = longest row + 1) and masks each row past its own length;
free slots in the prefix compute throw-away values.

`SlotBatch` has `KVBatch`'s interface (`rows`, `merge`, `select`, `decode`), so the engine drives either one:
prefills still run through the model's own forward (`KVBatch.prefill`), and `merge` copies their keys and values
into slots.

Legend: B rows, L layers, K kv heads, S key length, H head dim, V vocab.
"""

from __future__ import annotations

import torch

from .decode_step import DecodeStep
from .kv_batch import KVBatch

CHUNK = 256  # capacity grows by this many key columns at a time


class SlotCache:
    """The preallocated tensors. `keys[l]`, `values[l]`: [slots, K, capacity, H]; `dts[l]`: [slots, K or N, capacity]."""

    def __init__(self, step: DecodeStep, slots: int, max_len: int):
        self.step, self.slots, self.max_len = step, slots, max_len
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.dts: list[torch.Tensor] = []
        self.ensure(1)

    @torch.inference_mode()
    def ensure(self, columns: int) -> None:
        """Grow every layer's tensors to hold more than `columns` keys per slot."""
        if columns < self.capacity:
            return
        if columns > self.max_len:
            raise ValueError(f"{columns} cached positions exceed the context length max_len={self.max_len}")
        capacity = min(self.max_len + 1, -(-(columns + 1) // CHUNK) * CHUNK)  # > columns: see the module docstring
        K, H, dtype = self.step.kv_heads, self.step.head_dim, self.step.dtype

        def grown(old: torch.Tensor | None, shape: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
            new = torch.full(shape, fill, dtype=dtype)
            if old is not None:
                new[:, :, : self.capacity] = old
            return new

        L = self.step.num_layers
        old = (self.keys, self.values, self.dts) if self.capacity else ([None] * L,) * 3
        self.keys = [grown(t, (self.slots, K, capacity, H)) for t in old[0]]
        self.values = [grown(t, (self.slots, K, capacity, H)) for t in old[1]]
        minimum = torch.finfo(dtype).min
        self.dts = [grown(t, (self.slots, self.step.dt_heads, capacity), minimum) for t in old[2]]
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (self.keys, self.values, self.dts) for t in ts)


class SlotBatch:
    """Rows decoding together over a `SlotCache`; row i lives in slot `slot_of_row[i]`."""

    def __init__(self, step: DecodeStep, slots: int, max_len: int):
        self.step = step
        self.cache = SlotCache(step, slots, max_len)
        self.lengths = torch.zeros(slots, dtype=torch.long)  # [slots] tokens cached per slot (0 = free)
        self.slot_of_row: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.slot_of_row)

    @property
    def free_slots(self) -> int:
        return self.cache.slots - self.rows

    @torch.inference_mode()
    def merge(self, other: KVBatch) -> None:
        """Move `other`'s rows (a left-padded prefill) into free slots, lowest first."""
        if other.rows > self.free_slots:
            raise ValueError(f"{other.rows} new rows do not fit in {self.free_slots} free slots")
        used = set(self.slot_of_row)
        free = [s for s in range(self.cache.slots) if s not in used]
        self.cache.ensure(other.length + 1)
        for r in range(other.rows):
            slot = free[r]
            length = int(other.valid[r].sum())
            start = other.length - length  # left padding: the row's tokens are the last `length` columns
            for i, layer in enumerate(other.cache.layers):
                k, v = layer.keys[r, :, start:], layer.values[r, :, start:]  # [K, T, H]
                self.cache.keys[i][slot, :, :length] = k
                self.cache.values[i][slot, :, :length] = v
                self.cache.dts[i][slot, :, :length] = self.step.dt(i, v)
                self.cache.dts[i][slot, :, length:] = torch.finfo(self.step.dtype).min  # a former row's keys
            self.lengths[slot] = length
            self.slot_of_row.append(slot)

    def select(self, keep: torch.Tensor | list[int]) -> None:
        """Keep only rows `keep` (each at most once); the other rows' slots become free."""
        keep = [int(i) for i in keep]
        if len(set(keep)) != len(keep):
            raise ValueError(f"select(keep={keep}) repeats a row; slots hold one sequence each")
        kept = [self.slot_of_row[i] for i in keep]
        for slot in set(self.slot_of_row) - set(kept):
            self.lengths[slot] = 0
        self.slot_of_row = kept

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; return next-token logits [B, V]."""
        rows = torch.tensor(self.slot_of_row, dtype=torch.long)
        high = int(rows.max()) + 1
        ids = torch.zeros(high, dtype=torch.long)
        ids[rows] = torch.tensor(tokens, dtype=torch.long)
        positions = self.lengths[:high].clone()  # free slots write (and read) column 0, which nobody reads
        keys = int(positions.max()) + 1
        self.cache.ensure(keys)
        logits = self.step(ids, positions, self.cache, rows, keys)
        self.lengths[rows] += 1
        return logits
