"""Load an exported model and its tokenizer with plain transformers, from a local dir or the Hugging Face Hub.

Exported Doge checkpoints use transformers' native `DogeForCausalLM` (model_type "doge"). The one exception is
the first published SmallDoge layout (Doge-60M/160M/320M): `convert to-hf` writes those with a modeling file of
their own, named by config.json's `auto_map`, and that code runs only with `trust_remote_code=True`
(`--trust-remote-code`). Without it such a model is refused up front, from config.json alone: transformers
itself would fall back to the native Doge class, which cannot hold that layout (a size-mismatch error, or with
as many kv heads as heads a model that silently computes something else). A path that exists
locally is read from disk; anything else is a Hub id, downloaded (or taken from the local HF cache when
HF_HUB_OFFLINE=1) by `from_pretrained`.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("serve.loading")

CONVERT_HINT = ("convert it with `python -m convert from-hf --hf {model} --out CKPT` then "
                "`python -m convert to-hf --checkpoint CKPT --out DIR` and serve DIR with --trust-remote-code")


class RemoteCodeRefused(ValueError):
    """The model ships modeling code and the operator did not pass --trust-remote-code."""


def _raw_config(model: str, revision: str | None) -> dict:
    from transformers import PretrainedConfig

    kwargs = {} if os.path.isdir(model) else {"revision": revision}
    config, _ = PretrainedConfig.get_config_dict(model, **kwargs)
    return config


def check_remote_code(model: str, revision: str | None = None, trust_remote_code: bool = False) -> None:
    """Raises RemoteCodeRefused when config.json names remote code (`auto_map`) and it is not trusted."""
    if trust_remote_code:
        return
    try:
        auto_map = _raw_config(model, revision).get("auto_map")
    except (OSError, ValueError):
        return  # no readable config.json: loading reports that itself
    if auto_map:
        code = auto_map.get("AutoModelForCausalLM", next(iter(auto_map.values())))
        raise RemoteCodeRefused(f"model={model!r} ships its own modeling code (config.json auto_map: {code}); "
                                f"pass --trust-remote-code to run it")


def load(model: str, revision: str | None = None, chat_template: str | None = None, trust_remote_code: bool = False):
    """Return (model, tokenizer), both ready for CPU inference. The model is float32 whatever its checkpoint
    holds: the engine turns its linears into `--dtype` (or int8) and keeps norms, `dt` and softmax in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_remote_code(model, revision, trust_remote_code)
    local = os.path.isdir(model)
    kwargs = {"trust_remote_code": trust_remote_code}
    if not local:
        kwargs["revision"] = revision
    log.info("loading %s %s%s", "local dir" if local else "Hub model", model,
             " (trusting its remote code)" if trust_remote_code else "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kwargs).eval()
    except ImportError as exc:
        if not trust_remote_code:
            raise
        # The original SmallDoge Hub repos: their modeling_doge.py imports names transformers 5 removed.
        import transformers

        raise ImportError(f"model={model!r}: its remote code does not import under transformers "
                          f"{transformers.__version__} ({str(exc).splitlines()[0]}); "
                          + CONVERT_HINT.format(model=model)) from None
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
