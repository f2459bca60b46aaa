"""Server settings: one frozen dataclass, filled from the command line (`python -m serve --help`)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    model: str  # a local directory written by the exporter, or a Hugging Face Hub id
    served_model_name: str | None = None  # the `model` clients send; defaults to the dir's name / the Hub id
    revision: str | None = None  # Hub revision (branch, tag or commit); ignored for local dirs
    # Weights of the linear layers: "auto" is bfloat16 where the CPU has bf16 dot products (AVX-512 BF16, AMX: half
    # the bytes a token reads, fp32 accumulation), else float32. Norms, dt, softmax and the KV cache stay float32.
    dtype: str = "auto"
    chat_template: str | None = None  # a Jinja file or string, for models exported without one
    api_key: str | None = None  # when set, /v1 and tokenize routes need `Authorization: Bearer KEY`
    max_batch: int = 16  # rows decoded together; 8-16 saturates two CPU cores on Doge-20M
    max_queue: int = 64  # sequences allowed to wait for a batch slot before 429
    threads: int | None = None  # torch intra-op threads; None: every usable core (OpenMP waits passively)
    decode_path: str = "static"  # "static": slot cache + hand-written step (faster); "dynamic": the model's forward
    quantize: str | None = None  # "int8": int8 linears and LM head, kernels chosen by measurement at start-up
    # The static step's layers through torch.compile (serve/compiled.py): faster steps, a slower start (1.5-2
    # minutes on 2 cores, ~80 s once inductor's caches hold its builds), a C++ compiler needed.
    compile: bool = False
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
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be one of auto, float32, bfloat16")
        if self.decode_path not in ("static", "dynamic"):
            raise ValueError(f"decode_path={self.decode_path!r} must be one of static, dynamic")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"quantize={self.quantize!r} must be int8 or unset")
        if self.compile and self.decode_path != "static":
            raise ValueError(f"compile=True compiles the static decode path, not decode_path={self.decode_path!r}; "
                             "drop one of them")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} must be >= 1")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        path = self.model.rstrip("/")
        return os.path.basename(path) if os.path.isdir(path) else path
