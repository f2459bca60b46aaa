"""The OpenAI-compatible API, driven by the official `openai` SDK against a real server process."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from serve_fixtures import client, metric, server, tiny_model_dir  # noqa: F401  (pytest fixtures)

MODEL = "tiny-doge"
HELLO = [{"role": "user", "content": "Hello, how are you?"}]
# Random weights rarely pick EOS, but `ignore_eos` makes the token counts exact.
EXACT = {"ignore_eos": True}


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, extra_body=EXACT)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, max_completion_tokens=5,
                                       extra_body=EXACT)
    assert r.usage.completion_tokens == 5


def test_chat_stream_contract(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, stream=True,
                                                 extra_body=EXACT))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)  # usage only when stream_options asks
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0,
                                           extra_body=EXACT).choices[0].message.content
    greedy = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0,
                                                stream=True, extra_body=EXACT)
    )
    assert greedy == whole and isinstance(streamed, str)


def test_stream_usage_and_done_on_the_wire(server):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="The parser reads", max_tokens=7, extra_body=EXACT)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    default = client.completions.create(model=MODEL, prompt="The parser reads", extra_body=EXACT)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_completions_stream_n_prompts_and_echo(client):
    chunks = list(client.completions.create(model=MODEL, prompt=["One", "Two"], n=2, max_tokens=4, stream=True,
                                            extra_body=EXACT))
    assert len({c.id for c in chunks}) == 1
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length", 2: "length", 3: "length"}
    r = client.completions.create(model=MODEL, prompt=["One", "Two"], n=2, max_tokens=4, echo=True, extra_body=EXACT)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("One") and r.choices[3].text.startswith("Two")
    assert r.usage.completion_tokens == 16


def test_token_id_prompt(client):
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, extra_body=EXACT)
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 3


def test_seed_is_per_request(client):
    def ask(seed):
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=1.0,
                                              seed=seed, extra_body=EXACT).choices[0].message.content

    # Same seed, same text — also while other requests decode in the same batch.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(ask, [7, 7, 8, 7]))
    assert texts[0] == texts[1] == texts[3]
    assert ask(7) == texts[0]
    assert len({ask(s) for s in (1, 2, 3)}) > 1


def test_n_choices_differ_and_are_seeded(client):
    r1 = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, n=3, seed=3, extra_body=EXACT)
    r2 = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, n=3, seed=3, extra_body=EXACT)
    texts = [c.message.content for c in r1.choices]
    assert texts == [c.message.content for c in r2.choices]
    assert len(set(texts)) > 1
    assert r1.usage.completion_tokens == 36


def test_greedy_is_the_same_alone_and_batched(client):
    def ask(prompt):
        msgs = [{"role": "user", "content": prompt}]
        return client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0,
                                              extra_body=EXACT).choices[0].message.content

    prompts = ["short", "a rather longer prompt that pads the others", "mid length one", "x"]
    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_stop_strings_trim_at_character_level(client):
    greedy = dict(model=MODEL, prompt="The parser reads", max_tokens=40, temperature=0, extra_body=EXACT)
    full = client.completions.create(**greedy).choices[0].text
    stop = full[10:13]  # likely straddles a token boundary
    expected = full[: full.index(stop)]
    r = client.completions.create(**greedy, stop=[stop, "never-appears"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**greedy, stop=stop, stream=True))
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == expected  # held-back text that turned out to be the stop never went out
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, logprobs=True, top_logprobs=3,
                                       extra_body=EXACT)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.bytes == list(entry.token.encode())
    c = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, logprobs=2, extra_body=EXACT)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_logit_bias_steers_sampled_and_greedy_tokens(client, server):
    """OpenAI's logit_bias is added to the logits before sampling: +100 makes a token every choice, sampled or
    greedy; -100 takes the greedy leader's +100 back."""
    def text(tokens):
        return httpx.post(server.url + "/detokenize", json={"tokens": tokens}, timeout=30).json()["prompt"]

    def ask(bias, **kwargs):
        return client.completions.create(model=MODEL, prompt="abc", max_tokens=5, logit_bias=bias,
                                         extra_body=EXACT, **kwargs).choices[0].text

    assert ask({"60": 100}, temperature=1.0, seed=4) == text([60] * 5)
    both = ask({"60": 100, "61": 100}, temperature=0)  # both lead by ~100: the model's own logits decide
    first = 60 if both.startswith(text([60])) else 61
    other = 121 - first
    # "060" names the same token as "60": their biases add up, 100 - 100, and the other one wins every step
    assert ask({"60": 100, "61": 100, f"0{first}": -100}, temperature=0) == text([other] * 5)


def test_sampling_options_accepted(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *HELLO], max_tokens=8,
        temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, seed=1,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True,
                    "some_future_field": {"x": 1}},  # unknown fields are ignored
        user="someone",
    )
    assert r.usage.completion_tokens == 8


def test_models_health_metrics_tokenize_schema(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert metric(server, "doge_serve_generation_tokens_total") > 0
    text = httpx.get(server.url + "/metrics").text
    assert 'doge_serve_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert "doge_serve_time_to_first_token_seconds_bucket" in text
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    back = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back["prompt"] == "hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": HELLO}).json()
    assert chat["count"] > tokens["count"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]
    refused = httpx.post(server.url + "/tokenize", json={"messages": image})  # counted as text it would be empty
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].content[0].type"
    schema = httpx.get(server.url + "/schema/openapi.json").json()
    post = schema["paths"]["/v1/chat/completions"]["post"]
    assert "requestBody" in post and "/v1/completions" in schema["paths"]


def test_disconnect_stops_generation(server):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1800, "stream": True, "ignore_eos": True}
    before = metric(server, "doge_serve_generation_tokens_total")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    _wait_idle(server)
    generated = metric(server, "doge_serve_generation_tokens_total") - before
    assert generated < 1800
    time.sleep(0.3)
    assert metric(server, "doge_serve_generation_tokens_total") - before == generated  # nothing more decodes


def test_disconnect_stops_non_streamed_generation(server):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1800, "ignore_eos": True}
    before = metric(server, "doge_serve_generation_tokens_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.3)
    _wait_idle(server)
    assert metric(server, "doge_serve_generation_tokens_total") - before < 1800


def test_concurrent_streams_all_complete(client, server):
    def stream(i):
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"client {i}"}], max_tokens=30, stream=True,
            extra_body=EXACT))
        return chunks[-1].choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(stream, range(8))) == ["length"] * 8
    _wait_idle(server)


def _wait_idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(server.url + "/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"server still busy after {timeout}s: {health}")
