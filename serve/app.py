"""The Litestar app: OpenAI-compatible routes, auth, metrics and the chat page, around one `Engine`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}], POST /tokenize,
POST /detokenize, GET /health, GET /metrics, GET / (chat page), OpenAPI at /schema.
Handlers only validate and translate; generation runs on the engine's worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

from litestar import Litestar, Request, Response, get, post
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.response import Stream

from . import scoring, validate
from .config import ServeConfig
from .engine import Engine, Overloaded
from .errors import EXCEPTION_HANDLERS, APIError
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .responses import Reply

log = logging.getLogger("serve.app")

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class EventStream(Stream):
    """An SSE body. Litestar 2.x lets the handler's default (JSON) media type win over the response's own, so
    the event-stream type is forced here."""

    def to_asgi_response(self, *args, **kwargs):
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(*args, **kwargs)


def _state(request: Request | ASGIConnection):
    return request.app.state


def _check_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    expected = connection.app.state.config.api_key
    if not expected:
        return
    header = connection.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), expected.encode()):
        shown = (key[:3] + "..." + key[-2:]) if len(key) > 6 else ("(none)" if not key else "***")
        raise NotAuthorizedException(f"Incorrect API key provided: {shown}")


async def _wait_disconnect(request: Request) -> None:
    """Resolves when the client hangs up (the body is already read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _submit(request: Request, prompts, params, n: int):
    state = _state(request)
    validate.check_choices(len(prompts) * n, state.engine.max_batch)
    try:
        return state.engine.submit(prompts, params, n)
    except Overloaded as exc:
        raise APIError(429, str(exc), code="rate_limit_exceeded") from None


async def _answer(request: Request, reply: Reply, stream: bool, include_usage: bool):
    if stream:
        return EventStream(reply.stream(include_usage), media_type="text/event-stream", headers=_SSE_HEADERS)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        return await reply.collect(watcher)
    finally:
        watcher.cancel()


def _reply(request: Request, kind: str, handle, echoed: list[scoring.EchoedPrompt] | None = None) -> Reply:
    state = _state(request)
    echo_logprobs = [e.entries for e in echoed] if echoed and echoed[0].entries is not None else None
    return Reply(kind, state.config.model_name, handle, state.metrics.ttft.observe, state.metrics.latency.observe,
                 echo=[e.text for e in echoed] if echoed else None, echo_logprobs=echo_logprobs)


@post("/v1/chat/completions", guards=[_check_api_key], status_code=200, tags=["openai"])
async def chat_completions(request: Request, data: ChatCompletionRequest) -> dict | Stream:
    """OpenAI chat completions, rendered with the model's chat template; streamed when `stream` is true."""
    state = _state(request)
    validate.check_model(data.model, state.config.model_name)
    prompt = validate.chat_prompt(state.tokenizer, data.messages)
    requested = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
    max_tokens = validate.resolve_max_tokens(
        [prompt], requested, state.config.default_max_tokens, state.engine.max_model_len, "messages"
    )
    params = validate.sampling_params(data, max_tokens, validate.chat_logprobs(data), len(state.tokenizer))
    handle = _submit(request, [prompt], params, data.n)
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    return await _answer(request, _reply(request, "chat", handle), data.stream, include_usage)


@post("/v1/completions", guards=[_check_api_key], status_code=200, tags=["openai"])
async def completions(request: Request, data: CompletionRequest) -> dict | Stream:
    """OpenAI (legacy) text completions: no chat template; `max_tokens` defaults to 16 as OpenAI's does."""
    state = _state(request)
    validate.check_model(data.model, state.config.model_name)
    validate.check_echo(data.max_tokens, data.echo)
    prompts = validate.completion_prompts(state.tokenizer, data.prompt)
    max_tokens = validate.resolve_max_tokens(prompts, data.max_tokens, 16, state.engine.max_model_len, "prompt")
    params = validate.sampling_params(data, max_tokens, data.logprobs, len(state.tokenizer))
    echoed = await state.scorer.echo(prompts, data.logprobs) if data.echo else None
    if max_tokens == 0:
        validate.check_choices(len(prompts) * data.n, state.engine.max_batch)
        handle = scoring.finished_handle(prompts, params, data.n)
    else:
        handle = _submit(request, prompts, params, data.n)
    reply = _reply(request, "completion", handle, echoed)
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    return await _answer(request, reply, data.stream, include_usage)


def _model_card(state) -> dict:
    return {
        "id": state.config.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "doge-jax",
        "max_model_len": state.engine.max_model_len,
    }


@get("/v1/models", guards=[_check_api_key], tags=["openai"])
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(_state(request))]}


@get("/v1/models/{model:path}", guards=[_check_api_key], tags=["openai"])
async def retrieve_model(request: Request, model: str) -> dict:
    state = _state(request)
    validate.check_model(model.lstrip("/"), state.config.model_name)
    return _model_card(state)


@post("/tokenize", guards=[_check_api_key], status_code=200, tags=["tokens"])
async def tokenize(request: Request, data: TokenizeRequest) -> dict:
    """Token ids of `prompt`, or of `messages` rendered with the chat template."""
    state = _state(request)
    validate.check_model(data.model, state.config.model_name)
    if (data.prompt is None) == (data.messages is None):
        raise APIError(400, "Give exactly one of 'prompt' or 'messages'", param="prompt", code="invalid_value")
    if data.messages is not None:
        ids = validate.chat_prompt(state.tokenizer, data.messages, data.add_generation_prompt)
    else:
        ids = state.tokenizer(data.prompt, add_special_tokens=data.add_special_tokens)["input_ids"]
    return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}


@post("/detokenize", guards=[_check_api_key], status_code=200, tags=["tokens"])
async def detokenize(request: Request, data: DetokenizeRequest) -> dict:
    state = _state(request)
    validate.check_model(data.model, state.config.model_name)
    vocab = len(state.tokenizer)
    for i, t in enumerate(data.tokens):
        if not 0 <= t < vocab:
            raise validate.invalid(f"tokens[{i}]", t, f"expected a token id in [0, {vocab})")
    return {"prompt": state.tokenizer.decode(data.tokens)}


@get("/health", tags=["ops"])
async def health(request: Request) -> dict:
    engine = _state(request).engine
    return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}


@get("/metrics", tags=["ops"], media_type="text/plain; version=0.0.4")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@get("/", include_in_schema=False, media_type="text/html")
async def chat_page() -> Response:
    html = resources.files(__package__).joinpath("static/index.html").read_bytes()
    return Response(html, media_type="text/html; charset=utf-8")


def create_app(config: ServeConfig, engine: Engine | None = None, tokenizer=None) -> Litestar:
    """The app. Without an `engine`, the model named by `config.model` is loaded at startup (lifespan)."""

    @asynccontextmanager
    async def lifespan(app: Litestar):
        state = app.state
        if state.engine is None:
            from .loading import load

            try:
                model, tok = await asyncio.to_thread(
                    load, config.model, config.revision, config.chat_template, config.trust_remote_code
                )
            except Exception as exc:
                log.error("cannot load model %r: %s: %s", config.model, type(exc).__name__, exc)
                raise
            state.engine = Engine(model, tok, config.max_batch, config.max_queue, config.threads,
                                  config.decode_path, config.quantize, config.dtype, config.compile)
            state.tokenizer = tok
        state.scorer = scoring.PromptScorer(state.engine.model, state.tokenizer)
        await asyncio.to_thread(state.engine.start)
        log.info("serving %s (max_batch=%d, max_queue=%d, threads=%s)", config.model_name, config.max_batch,
                 config.max_queue, f"1 or {state.engine.threads}, by timing" if state.engine.thread_chooser
                 else state.engine.threads)
        try:
            yield
        finally:
            await asyncio.to_thread(state.engine.stop)

    handlers = [chat_completions, completions, list_models, retrieve_model, tokenize, detokenize, health, metrics,
                chat_page]
    app = Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(title="doge-serve", version="1.0.0", path="/schema"),
        cors_config=CORSConfig(allow_origins=["*"], allow_headers=["*"]),
        debug=False,
    )
    app.state.config = config
    app.state.engine = engine
    app.state.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
    app.state.started = int(time.time())
    app.state.metrics = Metrics(lambda: app.state.engine)
    app.state.metrics.known_paths.update(
        {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics",
         "/"}
    )
    return _with_metrics(app)


def _with_metrics(app: Litestar) -> Litestar:
    # Outermost ASGI wrapper, so responses produced by exception handlers are counted too.
    app.asgi_handler = app.state.metrics.middleware(app.asgi_handler)
    return app
