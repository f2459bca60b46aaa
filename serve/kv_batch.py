"""A batch of sequences decoding together over one left-padded KV cache.

Rows join (after their own prefill) and leave (finished, cancelled) at any step. Every row's tokens sit at the
right end of the cache, so a decode step appends one column for all rows at once; shorter rows are padded on the
left and masked out. Each row keeps its own position ids, so padding never shifts RoPE.

The mask is passed to the model already 4-D and additive ([B, 1, T, S], 0 = attend, dtype-min = masked):
transformers then uses it as-is, and Doge's dynamic (DMA) mask is added on top of it inside attention.

Legend: B rows, T new tokens this step, S cached key length, K kv heads, H head dim.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class KVBatch:
    def __init__(self, model):
        self.model = model
        self.dtype = model.dtype
        self.cache: DynamicCache | None = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # [B, S] which cache columns hold real tokens
        self.positions = torch.zeros(0, dtype=torch.long)  # [B] position id of each row's next token

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def _mask(self, valid_keys: torch.Tensor, queries: int) -> torch.Tensor:
        """Additive mask [B, 1, T, S] for `queries` new tokens at the right end of `valid_keys` [B, S]."""
        rows, keys = valid_keys.shape
        q_col = torch.arange(keys - queries, keys).unsqueeze(1)  # [T, 1] cache column of each query
        k_col = torch.arange(keys).unsqueeze(0)  # [1, S]
        causal = k_col <= q_col  # [T, S]
        # A padding query attends to itself, so no softmax row is all-masked (that would give NaNs in the cache).
        allowed = causal & (valid_keys[:, None, :] | (k_col == q_col))  # [B, T, S]
        mask = torch.zeros(rows, 1, queries, keys, dtype=self.dtype)
        return mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple["KVBatch", torch.Tensor]:
        """Run `prompts` (left-padded into one batch) through the model; return their KVBatch and last logits [B, V]."""
        longest = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), longest, dtype=torch.long)  # [B, T]
        valid = torch.zeros(len(prompts), longest, dtype=torch.bool)
        for i, p in enumerate(prompts):
            input_ids[i, longest - len(p) :] = torch.tensor(p)
            valid[i, longest - len(p) :] = True
        position_ids = (valid.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask(valid, longest),
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch = KVBatch(self.model)
        batch.cache, batch.valid = out.cache, valid
        batch.positions = valid.sum(-1)
        return batch, out.logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; return next-token logits [B, V]."""
        self.valid = torch.cat([self.valid, torch.ones(self.rows, 1, dtype=torch.bool)], dim=1)
        out = self.model(
            input_ids=torch.tensor(tokens, dtype=torch.long).unsqueeze(1),  # [B, 1]
            attention_mask=self._mask(self.valid, 1),
            position_ids=self.positions.unsqueeze(1),
            cache=self.cache,
            use_cache=True,
        )
        self.cache = out.cache
        self.positions = self.positions + 1
        return out.logits[:, -1].float()

    def _layers(self):
        return self.cache.layers if self.cache is not None else []

    def merge(self, other: "KVBatch") -> None:
        """Append `other`'s rows, left-padding whichever side is shorter."""
        if self.rows == 0:
            self.cache, self.valid, self.positions = other.cache, other.valid, other.positions
            return
        length = max(self.length, other.length)

        def pad(t: torch.Tensor, by: int) -> torch.Tensor:  # pad the key axis (-2 for K/V, -1 for valid) on the left
            if by == 0:
                return t
            shape = list(t.shape)
            axis = -2 if t.dim() == 4 else -1
            shape[axis] = by
            return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=axis)

        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([pad(mine.keys, length - self.length), pad(theirs.keys, length - other.length)])
            mine.values = torch.cat(
                [pad(mine.values, length - self.length), pad(theirs.values, length - other.length)]
            )  # [B, K, S, H]
        self.valid = torch.cat([pad(self.valid, length - self.length), pad(other.valid, length - other.length)])
        self.positions = torch.cat([self.positions, other.positions])

    def repeat_rows(self, counts: list[int]) -> None:
        """Row i becomes counts[i] identical rows: n choices share one prefill."""
        index = torch.repeat_interleave(torch.arange(self.rows), torch.tensor(counts))
        self.select(index)

    def select(self, keep: torch.Tensor | list[int]) -> None:
        """Keep only rows `keep`, then drop the left columns no remaining row uses."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        self.valid, self.positions = self.valid[keep], self.positions[keep]
        if self.rows == 0:
            self.cache, self.valid = None, torch.zeros(0, 0, dtype=torch.bool)
            return
        used = self.valid.any(0).nonzero()
        start = int(used[0]) if len(used) else self.length
        self.valid = self.valid[:, start:]
        for layer in self._layers():
            layer.keys = layer.keys[keep, :, start:]
            layer.values = layer.values[keep, :, start:]
