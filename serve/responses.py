"""Engine output -> OpenAI response bodies: whole JSON responses and `text/event-stream` chunk streams.

Stream contract (what clients check): every chunk carries the same `id`; a chat stream's first delta carries the
role; each choice ends with a chunk holding its `finish_reason`; usage comes in a last chunk with no choices only
when `stream_options.include_usage` asks; then `data: [DONE]`. A failure after the first byte can no longer change
the HTTP status, so it goes out as a `data: {"error": ...}` event, which the openai SDK raises.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from .engine import ChoiceDelta, EngineFailure, RequestHandle, TokenLogprob
from .errors import APIError
from .protocol import encode

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + encode(payload) + b"\n\n"


@dataclass
class Reply:
    """What one request is answered with, whatever its endpoint."""

    kind: str  # "chat" | "completion"
    model: str
    handle: RequestHandle
    observe_ttft: Any = None  # callable(seconds)
    observe_latency: Any = None
    echo: list[str] | None = None  # completions with echo: the prompt text of each prompt
    echo_logprobs: list[list[TokenLogprob]] | None = None  # with echo and logprobs: each prompt's entries (scoring.py)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    _first_token_seen: bool = False

    def __post_init__(self):
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        self.id = prefix + self.handle.id

    # ---- pieces --------------------------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        prompt, completion = self.handle.prompt_tokens, self.handle.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any] | None:
        if self.handle.params.logprobs is None:
            return None
        if self.kind == "chat":
            return {
                "content": [
                    {
                        "token": e.text,
                        "logprob": e.logprob,
                        "bytes": list(e.text.encode("utf-8")),
                        "top_logprobs": [
                            {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for _, t, v in e.top
                        ],
                    }
                    for e in entries
                ],
                "refusal": None,
            }
        offsets, at = [], offset
        for e in entries:
            offsets.append(at)
            at += len(e.text)
        return {
            "tokens": [e.text for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {t: v for _, t, v in e.top} for e in entries],
            "text_offset": offsets,
        }

    def _echo_logprobs(self, choice: int) -> dict[str, Any] | None:
        return self.logprobs(self.echo_logprobs[choice // self.handle.n]) if self.echo_logprobs else None

    def _chunk(self, choices: list[dict[str, Any]], usage: dict | None = None, with_usage: bool = False):
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if self.kind == "chat":
            body["system_fingerprint"] = None
        if with_usage:
            body["usage"] = usage
        return sse(body)

    def _delta_choice(self, d: ChoiceDelta, text_offset: int) -> dict[str, Any]:
        logprobs = self.logprobs(d.logprobs, text_offset) if d.logprobs else None
        if self.kind == "chat":
            return {"index": d.index, "delta": {"content": d.text}, "logprobs": logprobs, "finish_reason": None}
        return {"index": d.index, "text": d.text, "logprobs": logprobs, "finish_reason": None}

    def _finish_choice(self, d: ChoiceDelta) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason}
        return {"index": d.index, "text": "", "logprobs": None, "finish_reason": d.finish_reason}

    def _saw_tokens(self) -> None:
        if not self._first_token_seen:
            self._first_token_seen = True
            if self.observe_ttft:
                self.observe_ttft(time.perf_counter() - self.handle.submitted_at)

    def _done(self) -> None:
        if self.observe_latency:
            self.observe_latency(time.perf_counter() - self.handle.submitted_at)

    # ---- streaming -----------------------------------------------------------------------------------------

    async def stream(self, include_usage: bool) -> AsyncIterator[bytes]:
        """The SSE body. Cancelled by Litestar when the client disconnects, which cancels the generation."""
        choices = self.handle.choices
        offsets = [0] * choices
        try:
            if self.kind == "chat":
                first = [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(choices)
                ]
            elif self.echo:
                first = [
                    {"index": i, "text": self.echo[i // self.handle.n], "logprobs": self._echo_logprobs(i),
                     "finish_reason": None}
                    for i in range(choices)
                ]
                offsets = [len(c["text"]) for c in first]
            else:
                first = []
            # One choice per chunk, as OpenAI streams n > 1: clients read `chunk.choices[0]`.
            for choice in first:
                yield self._chunk([choice], with_usage=include_usage)
            async for deltas in self.handle.deltas():
                self._saw_tokens()
                for d in deltas:
                    if d.text or d.logprobs:
                        yield self._chunk([self._delta_choice(d, offsets[d.index])], with_usage=include_usage)
                        offsets[d.index] += len(d.text)
                    if d.finish_reason:
                        yield self._chunk([self._finish_choice(d)], with_usage=include_usage)
            if include_usage:
                yield self._chunk([], usage=self.usage(), with_usage=True)
            yield DONE
            self._done()
        except EngineFailure as exc:
            yield sse(APIError(500, str(exc), type="server_error", code="generation_failed").body())
        finally:
            self.handle.cancel()  # a no-op when finished; stops the worker's rows when the client left

    # ---- whole response ------------------------------------------------------------------------------------

    async def collect(self, disconnected: "asyncio.Future | None" = None) -> dict[str, Any]:
        """Wait for every choice and build the JSON body. Stops generating if `disconnected` resolves first."""
        choices = self.handle.choices
        texts = [self.echo[i // self.handle.n] if self.echo else "" for i in range(choices)]
        entries: list[list[TokenLogprob]] = [
            list(self.echo_logprobs[i // self.handle.n]) if self.echo_logprobs else [] for i in range(choices)
        ]
        finish: list[str | None] = [None] * choices
        start_offsets = [0 if self.echo_logprobs else len(t) for t in texts]  # the echoed tokens come first

        async def gather():
            async for deltas in self.handle.deltas():
                self._saw_tokens()
                for d in deltas:
                    texts[d.index] += d.text
                    entries[d.index].extend(d.logprobs)
                    finish[d.index] = d.finish_reason or finish[d.index]

        try:
            task = asyncio.ensure_future(gather())
            waiters = {task} | ({disconnected} if disconnected is not None else set())
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the client left: nobody will read the answer
                task.cancel()
                raise asyncio.CancelledError
            task.result()
        except EngineFailure as exc:
            raise APIError(500, str(exc), type="server_error", code="generation_failed") from None
        finally:
            self.handle.cancel()
        self._done()
        if self.kind == "chat":
            out = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i], "refusal": None},
                    "logprobs": self.logprobs(entries[i]),
                    "finish_reason": finish[i],
                }
                for i in range(choices)
            ]
            obj = "chat.completion"
        else:
            out = [
                {
                    "index": i,
                    "text": texts[i],
                    "logprobs": self.logprobs(entries[i], start_offsets[i]),
                    "finish_reason": finish[i],
                }
                for i in range(choices)
            ]
            obj = "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": out,
                "usage": self.usage()}
        if self.kind == "chat":
            body["system_fingerprint"] = None
        return body
