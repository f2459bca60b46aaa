"""Every bad input answers in OpenAI's error shape with OpenAI's status, and never with a 5xx."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from serve_fixtures import (  # noqa: F401  (pytest fixtures)
    API_KEY,
    client,
    server,
    strict_client,
    strict_server,
    tiny_model_dir,
    tiny_model_dir_no_template,
)

MODEL = "tiny-doge"
HELLO = [{"role": "user", "content": "Hello"}]


def assert_openai_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and "\n" not in err["message"] and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def post(server, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, timeout=30,
                      headers={"content-type": "application/json", **(headers or {})})


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "messages": HELLO, "temperature": 2.5}, "temperature"),
        ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": HELLO, "top_p": 0}, "top_p"),
        ({"model": MODEL, "messages": HELLO, "top_k": -2}, "top_k"),
        ({"model": MODEL, "messages": HELLO, "min_p": 1.5}, "min_p"),
        ({"model": MODEL, "messages": HELLO, "repetition_penalty": 0}, "repetition_penalty"),
        ({"model": MODEL, "messages": HELLO, "presence_penalty": 3}, "presence_penalty"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": HELLO, "max_completion_tokens": -1}, "max_completion_tokens"),
        ({"model": MODEL, "messages": HELLO, "n": 0}, "n"),
        ({"model": MODEL, "messages": HELLO, "n": 9}, "n"),  # more than the server's max_batch=8
        ({"model": MODEL, "messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"model": MODEL, "messages": HELLO, "top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"model": MODEL, "messages": HELLO, "stop": 5}, "stop"),
        ({"model": MODEL, "messages": HELLO, "seed": 2**70}, "seed"),
        ({"model": MODEL, "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": MODEL}, "messages"),
        ({"messages": HELLO}, "model"),
        # Accepted by OpenAI, not doable here: a 400 naming the field, never an answer that ignored it.
        ({"model": MODEL, "messages": HELLO, "response_format": {"type": "json_object"}}, "response_format"),
        ({"model": MODEL, "messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]}, "messages[0].content[0].type"),
        ({"model": MODEL, "messages": HELLO, "logit_bias": {"x": 1}}, "logit_bias['x']"),
        ({"model": MODEL, "messages": HELLO, "logit_bias": {"100000": 1}}, "logit_bias['100000']"),
    ],
)
def test_chat_bad_fields(server, body, param):
    err = assert_openai_error(post(server, "/v1/chat/completions", body), 400, param=param)
    assert err["type"] == "invalid_request_error"
    assert param.split(".")[-1].split("[")[0] in err["message"]  # the message names the field


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "prompt": {"a": 1}}, "prompt"),
        ({"model": MODEL, "prompt": [1, "a"]}, "prompt"),
        ({"model": MODEL, "prompt": [1, 2, 10**6]}, "prompt[2]"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs"),
        ({"model": MODEL, "prompt": ["a", "b", "c"], "n": 3}, "n"),  # 9 sequences > max_batch
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": "x", "suffix": "z"}, "suffix"),
        ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"-1": 1}}, "logit_bias['-1']"),
    ],
)
def test_completion_bad_fields(server, body, param):
    assert_openai_error(post(server, "/v1/completions", body), 400, param=param)


def test_logit_bias_out_of_range_and_what_stays_accepted(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}})
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"], r.text
    for extra in ({"response_format": {"type": "text"}}, {"tools": [], "tool_choice": "none"},
                  {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}):
        ok = post(server, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 2, **extra})
        assert ok.status_code == 200, (extra, ok.text)
    ok = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "best_of": 1, "suffix": ""})
    assert ok.status_code == 200, ok.text


def test_bad_value_is_quoted_in_the_message(server):
    err = assert_openai_error(post(server, "/v1/chat/completions", {"model": MODEL, "messages": HELLO,
                                                                   "temperature": 7.25}), 400, "temperature")
    assert "7.25" in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"just a string"', b'{"model": "tiny-doge",'])
def test_invalid_json(server, raw):
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert_openai_error(post(server, path, raw), 400)


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-17", messages=HELLO)
    assert exc.value.code == "model_not_found" and exc.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")
    assert_openai_error(post(server, "/v1/chat/completions", {"model": "gpt-17", "messages": HELLO}), 404,
                        code="model_not_found")


def test_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100_000)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"
    long_prompt = "word " * 5000
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=long_prompt, stream=True)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "prompt"


def test_sdk_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=5)
    assert exc.value.status_code == 400 and exc.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):  # a stream refused before it starts is a plain 400
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=5, stream=True)


def test_unknown_route_and_method(server):
    assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert_openai_error(post(server, "/tokenize", {"prompt": "a", "messages": HELLO}), 400)
    assert_openai_error(post(server, "/detokenize", {"tokens": [-1]}), 400, param="tokens[0]")


def test_bad_api_key_is_401(strict_server):
    for key in ("wrong", None):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        # Authentication is checked before the body is even parsed.
        for path, body in (("/v1/chat/completions", b"{bad"), ("/v1/completions", {"model": MODEL, "prompt": "x"})):
            assert_openai_error(post(strict_server, path, body, headers), 401, code="invalid_api_key")
        assert_openai_error(httpx.get(strict_server.url + "/v1/models", headers=headers), 401)
    bad = openai.OpenAI(base_url=strict_server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.code == "invalid_api_key"
    assert httpx.get(strict_server.url + "/health").status_code == 200  # ops routes stay open


def test_no_chat_template_is_400(strict_client):
    with pytest.raises(openai.BadRequestError) as exc:
        strict_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert exc.value.code == "chat_template_missing" and "--chat-template" in exc.value.message
    r = strict_client.completions.create(model=MODEL, prompt="still works", max_tokens=3)
    assert r.choices[0].text is not None


def test_overload_is_429(strict_client, strict_server):
    # The strict server holds one sequence and queues none: a second request while one streams is refused.
    stream = strict_client.completions.create(model=MODEL, prompt="long", max_tokens=400, stream=True,
                                              extra_body={"ignore_eos": True})
    try:
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as exc:
            strict_client.completions.create(model=MODEL, prompt="second", max_tokens=2)
        assert exc.value.status_code == 429 and exc.value.code == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            strict_client.completions.create(model=MODEL, prompt="second", max_tokens=2, n=1, stream=True)
    finally:
        stream.close()


def test_error_after_stream_start_is_an_sse_event():
    """A failure once bytes have gone out becomes `data: {"error": ...}`, which the SDK raises."""
    from serve.engine import EngineFailure, RequestHandle
    from serve.responses import Reply
    from serve.sampling import RequestSampling

    async def run() -> list[bytes]:
        handle = RequestHandle([[1, 2]], RequestSampling(max_tokens=4), 1, asyncio.get_running_loop())
        handle.queue.put_nowait(EngineFailure("generation failed: boom"))
        return [chunk async for chunk in Reply("chat", MODEL, handle).stream(include_usage=False)]

    chunks = asyncio.run(run())
    first = json.loads(chunks[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    last = json.loads(chunks[-1].decode()[6:])
    assert set(last) == {"error"} and last["error"]["message"] == "generation failed: boom"
    assert set(last["error"]) == {"message", "type", "param", "code"}

    # And the SDK turns that event into an exception for the caller.
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"".join(chunks))

    sdk = openai.OpenAI(api_key="x", base_url="http://test/v1", max_retries=0,
                        http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(openai.APIError, match="boom"):
        for _ in sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True):
            pass
