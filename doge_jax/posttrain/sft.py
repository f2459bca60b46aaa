"""Supervised fine-tuning on chats: next-token loss on the assistant tokens only, optional packing.

Records: {"messages": [...]} (posttrain.messages_field), or {"prompt": str | messages, "completion": str |
messages}. A row is laid out like a pretraining row, so the loss is pretraining's masked cross-entropy:

    input_ids   [T]  the rendered conversation(s), padding after
    targets     [T]  the next token where that token is an assistant token, else −100
    segment_ids [T]  1, 2, … per packed conversation, 0 on padding (attention never crosses segments)
    positions   [T]  0.. restarting at every conversation

Without packing each row holds one conversation. With packing, conversations are laid end to end while they
fit (a conversation that does not fit starts the next row). A conversation longer than seq_len is cut at
seq_len; one left with no assistant token is skipped.
"""

from __future__ import annotations

import jax
import numpy as np

from doge_jax.model.loss import IGNORE_INDEX
from doge_jax.posttrain import chat, records


def sft_loss(model, batch: dict, rng: jax.Array, *, loss_chunk_tokens: int = 0):
    """Mean cross-entropy over the assistant tokens of the micro-batch (`weight` = their count), plus the MoE
    terms when the model has them — the pretraining loss, fed rows whose non-assistant targets are −100."""
    from doge_jax.trainer.step import pretrain_loss

    return pretrain_loss(model, batch, rng, loss_chunk_tokens=loss_chunk_tokens)


def messages_of(record: dict, field: str, where: str) -> list[dict]:
    if field in record:
        return chat.check_messages(record[field], where)
    if "prompt" in record and "completion" in record:
        return (records.as_messages(record["prompt"], "user", where)
                + records.as_messages(record["completion"], "assistant", where))
    raise ValueError(f"{where}: has neither posttrain.messages_field={field!r} nor prompt/completion "
                     f"(keys: {sorted(record)})")


def example_arrays(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(input ids, aligned targets) cut to seq_len, or None when no assistant token is left."""
    ids, mask = ids[:seq_len], mask[:seq_len]
    targets = np.full(len(ids), IGNORE_INDEX, np.int32)
    targets[:-1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    if not (targets != IGNORE_INDEX).any():
        return None
    return ids, targets


class SFTAssembler:
    """Encodes records lazily (memoized) and lays them into rows; `__call__(stream, rows)` is one batch."""

    def __init__(self, tokenizer, recs: list[dict], *, seq_len: int, packing: bool, messages_field: str = "messages",
                 pad_id: int = 0):
        self.tokenizer, self.records, self.seq_len, self.packing = tokenizer, recs, seq_len, packing
        self.messages_field, self.pad_id = messages_field, pad_id
        self._cache: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}

    def example(self, i: int):
        if i not in self._cache:
            where = f"posttrain.dataset record {i}"
            ids, mask = chat.encode_chat(self.tokenizer, messages_of(self.records[i], self.messages_field, where))
            self._cache[i] = example_arrays(ids, mask, self.seq_len)
        return self._cache[i]

    def _next_example(self, stream: records.IndexStream):
        for _ in range(len(stream.indices) + 1):  # skip unusable records, but never loop forever
            ex = self.example(stream.peek())
            if ex is not None:
                return ex
            stream.advance()
        raise ValueError(f"no record of this shard has an assistant token within seq_len={self.seq_len}")

    def __call__(self, stream: records.IndexStream, rows: int) -> dict:
        T = self.seq_len
        batch = {"input_ids": np.full((rows, T), self.pad_id, np.int32),
                 "targets": np.full((rows, T), IGNORE_INDEX, np.int32),
                 "segment_ids": np.zeros((rows, T), np.int32), "positions": np.zeros((rows, T), np.int32)}
        for r in range(rows):
            used, segment = 0, 0
            while True:
                ids, targets = self._next_example(stream)
                n = len(ids)
                if segment and (not self.packing or used + n > T):
                    break  # row full: this conversation starts the next row
                batch["input_ids"][r, used:used + n] = ids
                batch["targets"][r, used:used + n] = targets
                batch["segment_ids"][r, used:used + n] = segment + 1
                batch["positions"][r, used:used + n] = np.arange(n)
                used, segment = used + n, segment + 1
                stream.advance()
                if not self.packing:
                    break
        return batch


def make_source(config, tokenizer):
    """The SFT batch source of a config (see stages.py)."""
    pt = config.posttrain
    recs = records.load_records(pt.dataset, hf_split=pt.hf_split)
    assembler = SFTAssembler(tokenizer, recs, seq_len=config.seq_len, packing=pt.packing,
                             messages_field=pt.messages_field, pad_id=_pad_id(tokenizer))
    return records.make_source(len(recs), assembler, eval_fraction=pt.eval_fraction, seed=config.seed)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
