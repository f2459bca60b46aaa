"""Serving exported Doge models on CPU: an OpenAI-compatible API and a chat page (torch + transformers, no jax).

Run it with `python -m serve --model DIR_OR_HUB_ID` or `doge-serve` (see serve/README.md). Public pieces, kept
out of this file so `import serve` stays light: `serve.app.create_app` (the Litestar app), `serve.engine.Engine`
(the worker that decodes concurrent requests together in dynamic batches) and
`serve.testing.make_tiny_model_dir` (a random tiny Doge + offline tokenizer for tests and benchmarks).
"""
