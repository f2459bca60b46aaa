"""python -m doge_jax.eval --checkpoint CKPT --tasks arc_easy,hellaswag [--limit N] [--include_path DIR]
                          [--output DIR] [--batch-size 16] [--num-fewshot K] [--apply-chat-template]

Evaluates a doge-jax checkpoint (a workdir or step folder, gs://..., a transformers folder or a Hub id) with
lm-evaluation-harness and prints a markdown table, the seed's published numbers beside it when the seed's tasks
ran (`--tasks doge_base`). With --output, writes results.json + results.md there; a local doge-jax workdir also
gets WORKDIR/eval_results.json, which `convert to-hf` puts into the model card (--no-record skips it).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m doge_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups, e.g. doge_base")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--include_path", "--include-path", dest="include_path", action="append", default=None,
                   help="a folder of your own lm-eval task YAMLs (repeatable)")
    p.add_argument("--output", default=None, help="folder for results.json and results.md")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=int, default=None)
    p.add_argument("--apply-chat-template", "--apply_chat_template", dest="apply_chat_template",
                   action="store_true")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (folder or Hub id)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--no-record", action="store_true", help="do not write WORKDIR/eval_results.json")
    args = p.parse_args(argv)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)

    from doge_jax import checkpoint as ckpt
    from doge_jax.eval import api, loading, results
    from doge_jax.eval.lm import DogeJaxLM

    try:
        lm = DogeJaxLM(checkpoint=args.checkpoint, tokenizer=args.tokenizer, step=args.step,
                       batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, dtype=args.dtype)
        out = api.evaluate(lm, args.tasks.split(","), limit=limit, num_fewshot=args.num_fewshot,
                           include_path=args.include_path, apply_chat_template=args.apply_chat_template)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = step = None
    if not args.no_record and not args.checkpoint.startswith("gs://") and not loading.is_hf_source(args.checkpoint):
        ref = ckpt.resolve(args.checkpoint, args.step)
        workdir, step = ref.workdir, ref.step
    results.write(out, args.output, workdir=workdir, name=lm.source, limit=limit, step=step)
    print(results.markdown(out, lm.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
