"""python -m convert to-hf --checkpoint CKPT --out DIR [--dtype bfloat16|float32] [--push-to-hub ORG/NAME]
python -m convert from-hf --hf DIR_OR_HUB_ID --out CKPT"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("to-hf", help="doge-jax checkpoint → transformers folder")
    t.add_argument("--checkpoint", required=True, help="training workdir (latest step) or one step's folder")
    t.add_argument("--out", required=True)
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--step", type=int, default=None)
    t.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload with HF_TOKEN")
    t.add_argument("--private", action="store_true")
    t.add_argument("--max-shard-size", default="2GB")
    t.add_argument("--overwrite", action="store_true")
    f = sub.add_parser("from-hf", help="transformers folder or Hub id → doge-jax checkpoint")
    f.add_argument("--hf", required=True, help="local folder or Hub id, e.g. SmallDoge/Doge-20M")
    f.add_argument("--out", required=True)
    f.add_argument("--revision", default=None)
    f.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from convert import api

    try:
        if args.command == "to-hf":
            out = api.to_hf(args.checkpoint, args.out, dtype=args.dtype, step=args.step,
                            push_to_hub=args.push_to_hub, max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite, private=args.private)
        else:
            out = api.from_hf(args.hf, args.out, revision=args.revision, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
