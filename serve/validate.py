"""From a decoded request to what the engine runs: token ids and `RequestSampling`, or an `APIError` (4xx).

Range checks live on the Structs (protocol.py); the checks here need the model: its name, its chat template,
its tokenizer's vocabulary and its context length.
"""

from __future__ import annotations

from typing import Any

from .errors import APIError, invalid
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from .sampling import RequestSampling


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"The model '{requested}' does not exist; this server serves '{served}'",
            param="model",
            code="model_not_found",
        )


def chat_prompt(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    """Render `messages` with the model's chat template and tokenize; 400 when the model has none, or for a
    content part that is not text (an image would otherwise be dropped without a word)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            "This model has no chat template: start the server with --chat-template FILE, or use /v1/completions",
            param="messages",
            code="chat_template_missing",
        )
    for i, message in enumerate(messages):  # chat completions and /tokenize alike
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type != "text":
                raise invalid(f"messages[{i}].content[{j}].type", part.type, "only \"text\" parts: this model reads "
                              "text only")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # the template's own checks (e.g. "roles must alternate") raise from Jinja
        raise APIError(400, f"The chat template rejected the messages: {exc}", param="messages") from None
    # The template already wrote BOS and the turn markers; tokenizing must not add them again.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_prompts(tokenizer, prompt: Any) -> list[list[int]]:
    """OpenAI's four prompt forms: "text", ["text", ...], [ids], [[ids], ...]."""
    vocab = len(tokenizer)

    def ids(value: list, where: str) -> list[int]:
        for i, t in enumerate(value):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise invalid(f"{where}[{i}]", t, f"expected a token id in [0, {vocab})")
        return value

    def text(value: str) -> list[int]:
        return tokenizer(value, add_special_tokens=True)["input_ids"]

    if isinstance(prompt, str):
        prompts = [text(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [text(p) for p in prompt]
    elif prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [ids(prompt, "prompt")]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    else:
        raise invalid("prompt", prompt, "expected a string, a list of strings, a list of token ids or a list of those")
    bos = getattr(tokenizer, "bos_token_id", None)
    for i, p in enumerate(prompts):
        if not p:
            if bos is None:
                raise invalid("prompt", "", "expected a non-empty prompt: the tokenizer has no BOS token to start from")
            prompts[i] = [bos]
    return prompts


def resolve_max_tokens(
    prompts: list[list[int]], requested: int | None, default: int | None, max_model_len: int, param: str
) -> int:
    """The generation budget, or 400 `context_length_exceeded` when prompt + budget exceed the context."""
    longest = max(len(p) for p in prompts)
    room = max_model_len - longest
    if requested == 0 and room >= 0:  # scoring the prompt only (echo): the prompt alone must fit
        return 0
    if room < 1 or (requested is not None and requested > room):
        wanted = longest + (requested if requested is not None else 1)
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {wanted} tokens "
            f"({longest} in the {param}, {wanted - longest} in the completion). Please reduce the length of the "
            f"{param} or completion.",
            param=param,
            code="context_length_exceeded",
        )
    if requested is not None:
        return requested
    return min(default, room) if default else room


def check_echo(max_tokens: int | None, echo: bool) -> None:
    if max_tokens == 0 and not echo:
        raise invalid("max_tokens", 0, "must be >= 1; 0 is only allowed with 'echo': true (scoring the prompt)")


def check_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for a field whose value would change the answer in a way this server cannot do."""
    fmt = req.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        raise invalid("response_format", fmt, "only {\"type\": \"text\"}: this server has no constrained decoding; "
                      "omit it and ask for JSON in the prompt")
    if isinstance(req, ChatCompletionRequest):
        if req.tools and req.tool_choice != "none":
            raise invalid("tools", [t.get("function", {}).get("name") if isinstance(t, dict) else t for t in req.tools],
                          "this server has no tool calling; omit 'tools' or set 'tool_choice': \"none\"")
    else:
        if req.suffix:
            raise invalid("suffix", req.suffix, "this server does not insert text after the completion; omit it")
        if req.best_of is not None and req.best_of > req.n:
            raise invalid("best_of", req.best_of, f"at most n={req.n}: this server returns every choice it "
                          "generates; ask for n choices instead")


def logit_bias(req: ChatCompletionRequest | CompletionRequest, vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as sorted (id, bias) pairs, each id checked against the vocabulary."""
    biases: dict[int, float] = {}
    for key, bias in (req.logit_bias or {}).items():
        token = int(key) if key.strip().lstrip("-").isdigit() else None
        if token is None or not 0 <= token < vocab:
            raise invalid(f"logit_bias[{key!r}]", key, f"expected a token id in [0, {vocab}), as a string")
        biases[token] = biases.get(token, 0.0) + float(bias)  # "5" and "05" name one token
    return tuple(sorted(biases.items()))


def sampling_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: int | None,
                    vocab: int) -> RequestSampling:
    check_unsupported(req)
    stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
    return RequestSampling(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stop=tuple(stop),
        seed=req.seed,
        logprobs=logprobs,
        ignore_eos=req.ignore_eos,
        min_tokens=min(req.min_tokens, max_tokens),
        logit_bias=logit_bias(req, vocab),
    )


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", req.top_logprobs, "requires 'logprobs': true")
    return (req.top_logprobs or 0) if req.logprobs else None


def check_choices(choices: int, max_batch: int, param: str = "n") -> None:
    if choices > max_batch:
        raise invalid(param, choices, f"prompts x n must be at most this server's max_batch={max_batch}")
