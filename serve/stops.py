"""Stop strings, matched on characters rather than tokens, with hold-back for streams.

A stop string can straddle token boundaries ("<|im" + "_end|>"), so matching runs on the decoded text. Text that
might be the beginning of a stop string is held back until the next token proves it is not, so a stream never
shows a client characters that the final answer would have trimmed.
"""

from __future__ import annotations


class StopStringFilter:
    """Feed decoded text in; get out the part that is safe to show, and whether a stop string was hit."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """Add `delta`; return (releasable text, stopped). After a stop, everything else is dropped."""
        if self.stopped:
            return "", True
        self.text += delta
        if not self.stops:
            return self._release(len(self.text)), False
        # Every stop occurrence starts at or after `sent`: a held-back suffix is never released early.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits)), True
        return self._release(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        """At end of generation the held-back text is not a stop string after all: release it."""
        if self.stopped:
            return ""
        return self._release(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest unreleased suffix of `text` that is a proper prefix of some stop string."""
        pending = len(self.text) - self.sent
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, pending), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], end
        return out
