"""python -m doge_jax.cli.continuation --dense CKPT --out CKPT_MOE --num-experts 1024 --top-k 8: a dense Doge
checkpoint continued as CDMoE (see doge_jax.continuation)."""

from __future__ import annotations

import argparse
import sys

from doge_jax.continuation import continue_from_dense


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m doge_jax.cli.continuation",
                                     description="Dense Doge checkpoint → CDMoE checkpoint (shared MLP = dense MLP, "
                                                 "fresh router and experts).")
    parser.add_argument("--dense", required=True, help="dense checkpoint: workdir, checkpoints/ or a step folder")
    parser.add_argument("--out", required=True, help="workdir to write (checkpoints/0 + tokenizer/)")
    parser.add_argument("--num-experts", type=int, required=True, help="a perfect square, e.g. 1024 or 16384")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token (num_experts_per_tok)")
    parser.add_argument("--step", type=int, default=None, help="dense step to read (default: latest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router and expert tables")
    parser.add_argument("--router-layout", default="per_token", choices=["per_token", "transformers"])
    parser.add_argument("--norm-topk-prob", action="store_true")
    parser.add_argument("--zero-up-embed", action="store_true",
                        help="start up_embed at 0: the MoE model then computes exactly the dense function")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = continue_from_dense(args.dense, args.out, num_experts=args.num_experts, top_k=args.top_k,
                                  seed=args.seed, zero_up_embed=args.zero_up_embed, step=args.step,
                                  overwrite=args.overwrite, router_layout=args.router_layout,
                                  norm_topk_prob=args.norm_topk_prob)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
