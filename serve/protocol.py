"""Request bodies of the OpenAI-compatible API, as msgspec Structs.

Litestar decodes and range-checks these (the `Meta` bounds below are also what /schema documents); a violation
becomes a 400 in OpenAI's error shape (see errors.py). Fields OpenAI defines that do not change what is generated
(`user`, `metadata`, `store`, ...) are simply not declared: msgspec ignores unknown fields, as OpenAI's own
servers ignore fields they do not know. Fields that would change what is generated and that this server cannot
honour (`response_format` other than text, `tools`, `suffix`, `best_of` above `n`, non-text content parts) are
declared so that a request using them gets a 400 naming the field (validate.py), not an answer that silently
ignored it.

Beyond OpenAI: `top_k`, `min_p`, `repetition_penalty`, `min_tokens` and `ignore_eos` (vLLM's names).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

Temperature = Annotated[float, Meta(ge=0.0, le=2.0, description="0 is greedy; higher is more random.")]
TopP = Annotated[float, Meta(gt=0.0, le=1.0, description="Nucleus sampling mass.")]
TopK = Annotated[int, Meta(ge=-1, description="Keep the k most likely tokens; 0 or -1 disables.")]
MinP = Annotated[float, Meta(ge=0.0, le=1.0, description="Drop tokens below min_p times the top probability.")]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0, description="HF-style penalty on seen tokens; 1 is off.")]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1, description="Most tokens to generate.")]
N = Annotated[int, Meta(ge=1, le=16, description="Choices to generate for each prompt.")]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1, description="Same seed and request, same output.")]
Stop = str | Annotated[list[str], Meta(max_length=16)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
LogitBias = Annotated[dict[str, Bias], Meta(max_length=300, description="Token id (as a string) -> bias added "
                                            "to its logit before sampling, in [-100, 100]; OpenAI's.")]


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class _SamplingFields(Struct, kw_only=True):
    """Options shared by both generation endpoints."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: Stop | None = None
    n: N = 1
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    ignore_eos: bool = False
    logit_bias: LogitBias | None = None
    response_format: dict[str, Any] | None = None  # only {"type": "text"} (validate.check_unsupported)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[Any] | None = None  # only empty, or with tool_choice "none" (validate.check_unsupported)
    tool_choice: Any = None


class CompletionRequest(_SamplingFields, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of those (checked in the handler: msgspec
    # unions cannot hold two array types).
    prompt: str | list[Any]
    # 0 is allowed with `echo`: score the prompt, generate nothing (what evaluation harnesses send).
    max_tokens: Annotated[int, Meta(ge=0, description="Tokens to generate; 0 with echo: score only.")] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool = False  # with logprobs: the prompt's tokens and their logprobs come first (the first one null)
    suffix: str | None = None  # only empty (validate.check_unsupported)
    best_of: Annotated[int, Meta(ge=1)] | None = None  # only <= n: each choice is returned


class TokenizeRequest(Struct, kw_only=True):
    """Either `prompt` (text) or `messages` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)
