"""Chat templates and the token-level encoding of conversations: which tokens the model is trained on.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`; an assistant
message may also carry `"reasoning_content"` (the thinking template renders it). The text is always the
tokenizer's own chat template — the one exported with the model and used by the server — so training and
serving see the same bytes. Two templates ship:

    DEFAULT  (the shipped tokenizer's):  <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n
    THINKING (reasoning distillation):   assistant turns become <think>\\n{reasoning}\\n</think>\\n{content} (an
                                          empty thought without reasoning_content), and the generation prompt
                                          opens the thought: <|im_start|>assistant\\n<think>\\n

Loss masks come from character offsets: an assistant turn's span is the text between the rendering of the
conversation before it (with the generation prompt) and the rendering through it, i.e. the reply, its
<|im_end|> and the newline after it. Tokens starting inside a span get a loss; everything else is context.
"""

from __future__ import annotations

from doge_jax.errors import ConfigError

import os
from collections.abc import Sequence

import numpy as np

from doge_jax.data.tokenizer import CHAT_TEMPLATE as DEFAULT_TEMPLATE

IM_END = "<|im_end|>"
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n<think>\n' + message.get('reasoning_content', '') + '\n</think>\n'"
    " + message['content'] + '<|im_end|>' + '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
TEMPLATES = {"default": DEFAULT_TEMPLATE, "thinking": THINKING_TEMPLATE}
ROLES = ("system", "user", "assistant")


def set_chat_template(tokenizer, spec: str = "auto"):
    """Applies `posttrain.chat_template` to the tokenizer: 'auto' keeps its own template (so a chain keeps the
    template its first stage chose) or sets DEFAULT when it has none; 'tokenizer' insists on its own;
    'default' / 'thinking' pick a shipped template; anything else is a Jinja file. Also makes <|im_end|> the
    eos when the vocabulary has it, so a server that stops at eos ends a reply where the template ends a turn."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if spec == "auto":
        if not has_own:
            tokenizer.chat_template = DEFAULT_TEMPLATE
    elif spec == "tokenizer":
        if not has_own:
            raise ConfigError("config.posttrain.chat_template='tokenizer' but the tokenizer has no chat template; "
                             "use 'auto', 'default', 'thinking' or a .jinja file")
    elif spec in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[spec]
    elif os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    else:
        raise ConfigError(f"config.posttrain.chat_template={spec!r} must be 'auto', 'tokenizer', 'default', 'thinking' or "
                         "a file")
    if IM_END in tokenizer.get_vocab():
        tokenizer.eos_token = IM_END
    return tokenizer


def check_messages(messages, where: str = "example") -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}} dicts, got {messages!r:.80}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: bad message {m!r:.80} (need role in {list(ROLES)} and string content)")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: list[dict], *, train_on: str = "assistant") -> tuple[np.ndarray, np.ndarray]:
    """A conversation → (ids [L] int32, loss mask [L] bool: True on the tokens the model learns to produce).

    train_on: 'assistant' (every assistant turn) or 'last' (only the final one, e.g. for preference data)."""
    full = render(tokenizer, messages)
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    for i in turns:
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[:i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render a conversation's prefix (with its generation prompt) "
                             "as a prefix of the whole; loss masks need a prefix-stable template")
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
    mask = np.zeros(len(ids), bool)
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    return ids, mask


def encode_prompt(tokenizer, messages: list[dict]) -> np.ndarray:
    """The tokens the server would feed for a reply to `messages` (ending with the generation prompt)."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def encode_reply(tokenizer, prompt: list[dict], reply: dict) -> tuple[np.ndarray, np.ndarray]:
    """prompt messages + one assistant reply → (ids, mask on the reply's tokens only)."""
    return encode_chat(tokenizer, prompt + [reply], train_on="last")
