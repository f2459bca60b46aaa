"""Load an exported model and its tokenizer with plain transformers, from a local dir or the Hugging Face Hub.

Exported Doge checkpoints use transformers' native `DogeForCausalLM` (model_type "doge"), so no remote code is
ever trusted. A path that exists locally is read from disk; anything else is a Hub id, downloaded (or taken from
the local HF cache when HF_HUB_OFFLINE=1) by `from_pretrained`.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("serve.loading")


def load(model: str, revision: str | None = None, dtype: str = "float32", chat_template: str | None = None):
    """Return (model, tokenizer), both ready for CPU inference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(model)
    kwargs = {} if local else {"revision": revision}
    log.info("loading %s %s", "local dir" if local else "Hub model", model)
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), **kwargs).eval()
    if lm.config.model_type != "doge":
        log.warning("model_type=%r is not 'doge'; serving it anyway, untested", lm.config.model_type)
    if chat_template:
        tokenizer.chat_template = _read_template(chat_template)
    return lm, tokenizer


def _read_template(value: str) -> str:
    """`--chat-template` takes a file path or the Jinja text itself."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value
