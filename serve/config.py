"""Server settings: one frozen dataclass, filled from the command line (`python -m serve --help`)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    model: str  # a local directory written by the exporter, or a Hugging Face Hub id
    served_model_name: str | None = None  # the `model` clients send; defaults to the dir's name / the Hub id
    revision: str | None = None  # Hub revision (branch, tag or commit); ignored for local dirs
    dtype: str = "float32"  # CPU matmuls are fastest and exact in float32; bfloat16 halves memory
    chat_template: str | None = None  # a Jinja file or string, for models exported without one
    api_key: str | None = None  # when set, /v1 and tokenize routes need `Authorization: Bearer KEY`
    max_batch: int = 16  # rows decoded together; 8-16 saturates two CPU cores on Doge-20M
    max_queue: int = 64  # sequences allowed to wait for a batch slot before 429
    threads: int | None = None  # torch intra-op threads; None: all usable cores but one (kept for HTTP)
    default_max_tokens: int | None = None  # chat default when the request sets none; None = rest of the context
    # Run the modeling code a model folder ships (config.json `auto_map`), as the first-layout SmallDoge exports
    # need. Off by default: that code runs with the server's rights, so it is the operator's explicit choice.
    trust_remote_code: bool = False
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} must be >= 1")
        if self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue} must be >= 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} must be one of float32, bfloat16, float16")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} must be >= 1")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        path = self.model.rstrip("/")
        return os.path.basename(path) if os.path.isdir(path) else path
