"""`python -m serve --model DIR_OR_HUB_ID` (or `doge-serve ...`): serve an exported model on CPU with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv: list[str] | None = None):
    from .config import ServeConfig

    d = ServeConfig(model="")
    p = argparse.ArgumentParser(prog="doge-serve", description=__doc__)
    p.add_argument("--model", required=True,
                   help="exported model dir, or a Hugging Face Hub id (e.g. SmallDoge/Doge-20M)")
    p.add_argument("--served-model-name", default=None,
                   help="name clients pass as `model` (default: dir name / Hub id)")
    p.add_argument("--revision", default=None, help="Hub revision: branch, tag or commit")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
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
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores - 1, at least 1)")
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
    try:  # config.json only: a refusal costs no model load and reads as one line, not a startup traceback
        check_remote_code(config.model, config.revision, config.trust_remote_code)
    except RemoteCodeRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=log_level,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
