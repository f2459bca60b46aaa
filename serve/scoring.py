"""Scoring the prompt itself: `/v1/completions` with `echo` and `logprobs` returns the prompt's own logprobs.

Evaluation harnesses (lm-evaluation-harness's `local-completions`, OpenAI's legacy evals) score a continuation by
sending context + continuation with `echo=true, logprobs=k, max_tokens=1` (or 0) and summing
`choices[i].logprobs.token_logprobs[ctxlen:-1]`. So an echoed prompt comes back token by token, as OpenAI's legacy
completions and vLLM return it: `tokens`, `token_logprobs` (the first is null: nothing predicts the first token),
`top_logprobs` (first null) and `text_offset`, followed by the generated tokens' entries. `max_tokens=0` with
echo scores the prompt and generates nothing.

The forward pass runs here, on a thread of its own beside the engine's worker: a torch module in eval mode under
`no_grad` holds no state between calls, so two threads may run it; a lock keeps prompt scoring to one pass at a
time. Each prompt gets its own forward pass, so a prompt's scores never depend on what it was batched with.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import torch

from .detokenize import IncrementalDetokenizer
from .engine import ChoiceDelta, RequestHandle, TokenLogprob
from .sampling import RequestSampling


@dataclass
class EchoedPrompt:
    """The text a prompt echoes as, and, when logprobs were asked for, one entry per prompt token.

    The entries' texts concatenate to `text` (so `text_offset` indexes it); the first entry's `logprob` and `top`
    are None."""

    text: str
    entries: list[TokenLogprob] | None


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded prompt (special tokens add ""); they concatenate to the decoding.

    Decoding tokens one by one would drop SentencePiece's leading spaces and split multi-byte characters, so
    this goes through the same incremental detokenizer as generation: a token that ends inside a character adds
    "" and the token completing it carries the whole character."""
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.add(t) for t in ids]
    if pieces:
        pieces[-1] += detok.flush()
    return pieces


class PromptScorer:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def _piece(self, token: int) -> str:
        # As the engine names alternatives: the token decoded on its own.
        return self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @torch.no_grad()
    def logprobs(self, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """ids [T] → (log p(ids[t] | ids[:t]) for t = 1..T-1, the `top` most likely (id, logprob) at each t)."""
        with self._lock:
            logits = self.model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0, :-1]  # [T-1, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(ids[1:], dtype=torch.long)
        chosen = logp.gather(-1, targets[:, None])[:, 0]  # [T-1]
        if top > 0:
            values, alt_ids = logp.topk(min(top, logp.shape[-1]), dim=-1)  # [T-1, top]
            alts = [list(zip(i.tolist(), v.tolist())) for i, v in zip(alt_ids, values)]
        else:
            alts = [[] for _ in range(len(ids) - 1)]
        return chosen.tolist(), alts

    def echo_one(self, ids: list[int], top: int | None) -> EchoedPrompt:
        texts = token_texts(self.tokenizer, ids)
        if top is None:
            return EchoedPrompt("".join(texts), None)
        chosen, alts = self.logprobs(ids, top) if len(ids) > 1 else ([], [])
        entries = [TokenLogprob(ids[0], texts[0], None, None)]
        for t in range(1, len(ids)):
            top_t = [(i, self._piece(i), v) for i, v in alts[t - 1]]
            entries.append(TokenLogprob(ids[t], texts[t], chosen[t - 1], top_t))
        return EchoedPrompt("".join(texts), entries)

    async def echo(self, prompts: list[list[int]], top: int | None) -> list[EchoedPrompt]:
        """Every prompt's echo (call from the event loop; the forward passes run on a worker thread)."""
        return await asyncio.to_thread(self._echo_all, prompts, top)

    def _echo_all(self, prompts: list[list[int]], top: int | None) -> list[EchoedPrompt]:
        torch.set_num_threads(1)  # this worker thread stays single-threaded: see Engine.start
        return [self.echo_one(p, top) for p in prompts]


def finished_handle(prompts: list[list[int]], params: RequestSampling, n: int) -> RequestHandle:
    """A handle for `max_tokens=0`: every choice already finished ("length") with nothing generated, so the
    ordinary reply path (JSON or stream) answers with the echo alone (call from the event loop)."""
    handle = RequestHandle([list(p) for p in prompts], params, n, asyncio.get_running_loop())
    handle.queue.put_nowait([ChoiceDelta(i, "", [], "length") for i in range(handle.choices)])
    return handle
