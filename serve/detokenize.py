"""Incremental detokenization: turn one new token id at a time into the new characters it adds.

Decoding token by token breaks in two ways: a multi-byte character split over byte-level tokens decodes to
U+FFFD until its last byte arrives, and SentencePiece-style tokenizers drop a word's leading space when a token is
decoded alone. So each step decodes a short window of recent tokens and emits only what the newest ones added,
and waits while the text still ends in an incomplete character (the scheme vLLM and TGI use).
"""

from __future__ import annotations

# Prompt tokens kept as left context, so the first generated word keeps its leading space.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = len(self.ids)  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a character is still partial."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still pending at the end, incomplete characters included."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]
