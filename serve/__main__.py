"""`python -m serve --model DIR_OR_HUB_ID` (or `doge-serve ...`): serve an exported model on CPU with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Before torch loads libgomp, which reads it once: OpenMP threads that finish a parallel region sleep instead of
# spinning. With every core in torch's pool (the default), spinning workers fight the event loop and any neighbour
# for the cores, and one that loses its core stalls every op: on the shared 2-core EPYC (load 5-13) a 2-thread
# Doge-20M step took 69-292 ms with spinning and 8-15 ms with passive waits (bench_serve.py --threads-check).
# Passive, but not at once: a worker spins GOMP_SPINCOUNT turns (libgomp's estimate: ~100,000 a millisecond, so
# ~0.1 ms) before it sleeps. A decode step runs ~40 parallel regions with a few microseconds of Python between
# them; a worker asleep in each gap must be woken by the kernel every time, which made two threads 3x slower than
# one on an idle box (bf16 Doge-20M step, batch 1: 5.8 ms on two passive threads, 2.1 ms on one, 1.9 ms on two
# spinning ~0.1 ms). A busy box costs at most ~0.1 ms of spinning per step, and threads.py then picks one thread.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# One OpenMP thread by default in every thread; the engine's thread sets its own count (Engine.start). libgomp
# keeps a team of workers for each thread that ever ran a parallel region on several threads, and with more
# workers than cores it cuts their spinning to 1,000 turns. Without this, importing torch left the main thread a
# worker and loading the model (on an event-loop executor thread) another, before the engine had run anything:
# on the 2-core EPYC the int8 kernels' start-up timing then saw w8a16 at 348 us for Doge-20M's eight q/k/v
# products at 1 row (236 us with it), chose float32 for every small layer at 1 row, and int8 served 1 client at
# 0.93x float32.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def parse_args(argv: list[str] | None = None):
    from .config import ServeConfig

    d = ServeConfig(model="")
    p = argparse.ArgumentParser(prog="doge-serve", description=__doc__)
    p.add_argument("--model", required=True,
                   help="exported model dir, or a Hugging Face Hub id (e.g. SmallDoge/Doge-20M)")
    p.add_argument("--served-model-name", default=None,
                   help="name clients pass as `model` (default: dir name / Hub id)")
    p.add_argument("--revision", default=None, help="Hub revision: branch, tag or commit")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"],
                   help="weights of the linear layers: auto (default) = bfloat16 where the CPU has bf16 dot products "
                        "(AVX-512 BF16, AMX), else float32; norms, dt, softmax and the KV cache stay float32; under "
                        "bfloat16 the LM head is int8 with its leading logits recomputed in float32")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file (or text) for models without one")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the modeling code the model folder ships (its config.json auto_map), e.g. a converted "
                        "first-layout SmallDoge model (Doge-60M/160M/320M); off by default")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", default=os.environ.get("DOGE_SERVE_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $DOGE_SERVE_API_KEY; unset = open)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="sequences waiting beyond the batch before 429")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    p.add_argument("--decode-path", default=d.decode_path, choices=["static", "dynamic"],
                   help="static: fixed KV-cache slots and a hand-written decode step (default); "
                        "dynamic: the model's own forward over a growing cache")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8 linear layers and LM head, on the kernels measured fastest at start-up (faster; "
                        "logits change slightly; --dtype then applies only to layers left unquantised)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step's layers with torch.compile (needs a C++ compiler; faster steps, "
                        "a start-up of 1.5-2 minutes on 2 cores, ~80 s once inductor's caches hold its builds)")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="chat budget when a request sets none (default: the rest of the context)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    config = ServeConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        revision=args.revision,
        dtype=args.dtype,
        chat_template=args.chat_template,
        trust_remote_code=args.trust_remote_code,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        threads=args.threads,
        decode_path=args.decode_path,
        quantize=args.quantize,
        compile=args.compile,
        default_max_tokens=args.default_max_tokens,
        host=args.host,
        port=args.port,
    )
    return config, args.log_level


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from .app import create_app
    from .loading import RemoteCodeRefused, check_remote_code

    config, log_level = parse_args(argv)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .engine import resolve_dtype

    try:  # config.json and this CPU only: a refusal costs no model load and reads as one line, not a traceback
        check_remote_code(config.model, config.revision, config.trust_remote_code)
        resolve_dtype(config.dtype)
        if config.compile:
            from .compiled import compiler

            if compiler() is None:
                raise ValueError("--compile: torch.compile needs a C++ compiler (g++ or clang++) and none was "
                                 "found; install one or start without --compile")
    except (RemoteCodeRefused, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    import torch

    # Torch on one core in every thread but the engine's, which sets its own count (Engine.start says why): the
    # model loads, and prompts are echoed, on single-threaded workers that inherit this.
    torch.set_num_threads(1)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=log_level,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
