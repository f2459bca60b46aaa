"""python -m doge_jax.cli.tokenizer train --corpus default --vocab-size 8192 --out DIR: a SentencePiece BPE
tokenizer exported as a HF tokenizer dir (see doge_jax.data.tokenizer)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from doge_jax.data.tokenizer import train_tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m doge_jax.cli.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece BPE tokenizer and export a HF tokenizer dir")
    train.add_argument(
        "--corpus",
        nargs="+",
        default=["default"],
        help="'default' (Python's own docs) and/or text/jsonl/parquet files or globs",
    )
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    args = parser.parse_args(argv)
    try:
        train_tokenizer(args.corpus, args.vocab_size, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
