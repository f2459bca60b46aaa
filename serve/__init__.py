"""Serving exported Doge models on CPU: an OpenAI-compatible API and a chat page (torch + transformers, no jax).

Its own distribution (serve/pyproject.toml): `pip install ./serve` installs it as `doge_serve` with the
`doge-serve` command; inside the repository `python -m serve --model DIR_OR_HUB_ID` runs this folder (see
serve/README.md). Public pieces, kept out of this file so importing the package stays light: `app.create_app`
(the Litestar app) and `engine.Engine` (the worker that decodes concurrent requests together in dynamic batches).
"""
