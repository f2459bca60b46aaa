"""The whole chain on CPU: pretrain → (export, re-import) → SFT → DPO → GRPO → export → a real server chats.

Every stage runs the Trainer with `posttrain.trainer_kwargs(config)` — what `python -m doge_jax.train` runs —
from configs/tiny_*.py with fewer steps. SFT starts from the pretraining run exported to transformers and
converted back (the "start from an HF model" path); DPO and GRPO start from the previous stage's workdir. The
end: `convert.to_hf`, then `python -m serve --model DIR` answers a chat completion through the exported chat
template with exactly the text the JAX sampler produces greedily for the same conversation.
"""

from __future__ import annotations

import math
import os

import httpx
import numpy as np
import pytest

import convert
from doge_jax import checkpoint as ckpt
from doge_jax.posttrain import chat, trainer_kwargs
from doge_jax.sampler import Sampler, SamplingParams
from doge_jax.data.tokenizer import load_tokenizer
from doge_jax.trainer import Trainer
from doge_jax.trainer.metrics import METRICS_FILE, read_jsonl

STEPS = {"pretrain": 6, "sft": 12, "dpo": 4, "grpo": 2}


def _run(stage: str, workdir: str, init_from: str = "") -> list[dict]:
    import importlib

    config = importlib.import_module(f"configs.tiny_{stage}").get_config()
    config.total_steps = STEPS[stage]
    config.log_every = 1
    config.init_from = init_from
    Trainer(config, workdir, **trainer_kwargs(config)).run()
    return read_jsonl(os.path.join(workdir, METRICS_FILE))


@pytest.mark.slow
def test_pretrain_sft_dpo_grpo_export_serve(tmp_path):
    from serve_fixtures import ServerProcess

    d = {name: str(tmp_path / name) for name in ("pretrain", "pretrain_hf", "from_hf", "sft", "dpo", "grpo", "hf")}
    _run("pretrain", d["pretrain"])
    convert.to_hf(d["pretrain"], d["pretrain_hf"])
    convert.from_hf(d["pretrain_hf"], d["from_hf"])

    sft_log = _run("sft", d["sft"], d["from_hf"])
    assert sft_log[-1]["ce_loss"] < sft_log[0]["ce_loss"] - 0.5  # assistant-token loss drops visibly
    dpo_log = _run("dpo", d["dpo"], d["sft"])
    assert all(math.isfinite(r["dpo_loss"]) for r in dpo_log)
    assert dpo_log[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    grpo_log = _run("grpo", d["grpo"], d["dpo"])
    assert all(0.0 <= r["reward"] <= 1.2 and r["completion_len"] > 0 and r["kl"] >= 0 for r in grpo_log)

    tok = load_tokenizer(os.path.join(d["grpo"], "tokenizer"))
    assert tok.eos_token == chat.IM_END and tok.chat_template == chat.TEMPLATES["default"]
    out = convert.to_hf(d["grpo"], d["hf"])
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = chat.encode_prompt(tok, messages)
    mine = Sampler(ckpt.load_model(d["grpo"]), pad_id=tok.pad_token_id)(
        [prompt.tolist()], SamplingParams(max_new_tokens=12, stop_tokens=(tok.eos_token_id,)))
    expected = tok.decode(mine.completions()[0], skip_special_tokens=True)

    # float32: the served text must be doge-jax's sampler's, token for token
    server = ServerProcess(out, tmp_path / "serve.log", "--threads", "1", "--dtype", "float32").wait_ready()
    try:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny-doge", "messages": messages, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
    finally:
        server.stop()
    assert body["usage"]["prompt_tokens"] == len(prompt)  # the server rendered the same template
    assert body["choices"][0]["message"]["content"] == expected, server.log()
    assert body["choices"][0]["finish_reason"] == ("stop" if mine.stopped[0] else "length")
    np.testing.assert_array_equal(mine.lengths, [body["usage"]["completion_tokens"]])
