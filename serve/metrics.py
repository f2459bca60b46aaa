"""Prometheus metrics at /metrics, in a registry of the app's own (several apps may live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Reads the engine's counters at scrape time instead of mirroring them on every token."""

    def __init__(self, engine_ref):
        self.engine_ref = engine_ref

    def collect(self):
        engine = self.engine_ref()
        if engine is None:
            return
        yield GaugeMetricFamily("doge_serve_running_sequences", "Sequences in the decoding batch",
                                value=engine.num_running)
        yield GaugeMetricFamily("doge_serve_waiting_sequences", "Sequences queued for a batch slot",
                                value=engine.num_waiting)
        yield CounterMetricFamily("doge_serve_prompt_tokens", "Prompt tokens prefilled",
                                  value=engine.prompt_tokens_total)
        yield CounterMetricFamily("doge_serve_generation_tokens", "Tokens generated",
                                  value=engine.generation_tokens_total)
        yield CounterMetricFamily("doge_serve_decode_steps", "Batched decode steps run",
                                  value=engine.decode_steps_total)
        yield CounterMetricFamily("doge_serve_decode_rows", "Rows decoded, summed over steps (/ steps = mean batch)",
                                  value=engine.decode_rows_total)
        if engine.thread_chooser is not None:
            steps = CounterMetricFamily("doge_serve_decode_steps_by_threads",
                                        "Decode steps by the torch thread count they ran on (chosen by timing)",
                                        labels=["threads"])
            for threads, count in sorted(engine.thread_chooser.used.items()):
                steps.add_metric([str(threads)], count)
            yield steps


class Metrics:
    def __init__(self, engine_ref):
        self.registry = CollectorRegistry()
        self.requests = Counter("doge_serve_requests", "HTTP requests by route and status",
                                ["path", "status"], registry=self.registry)
        self.ttft = Histogram("doge_serve_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("doge_serve_request_duration_seconds", "Request arrival to last token",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine_ref))
        self.known_paths: set[str] = set()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self, app):
        """ASGI middleware counting responses by path and status (unknown paths are pooled, not one per URL)."""

        async def wrapped(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            path = scope.get("path", "")
            label = path if path in self.known_paths else "other"
            if path.startswith("/v1/models/"):
                label = "/v1/models/{model}"

            async def counting_send(message):
                if message["type"] == "http.response.start":
                    self.requests.labels(label, str(message["status"])).inc()
                await send(message)

            await app(scope, receive, counting_send)

        return wrapped

