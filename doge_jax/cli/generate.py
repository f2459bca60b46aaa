"""Try a checkpoint from the command line: batched sampling with the KV-cache sampler.

    python -m doge_jax.generate --checkpoint runs/sft --chat --prompt "What is 12 + 30?"
    python -m doge_jax.generate --checkpoint runs/tiny --prompt "def fib(n):" --prompt "The" \\
        --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --seed 1

--checkpoint is a training workdir (its latest step), its checkpoints/ folder or one step's folder. The tokenizer
is the checkpoint's own (WORKDIR/tokenizer) unless --tokenizer names another. With --chat each prompt is a user
turn rendered through the tokenizer's chat template, and generation stops at <|im_end|> as well as at eos.
Temperature 0 (the default) is greedy. Exit codes: 0 ok, 2 bad arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m doge_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="workdir, its checkpoints/ folder, or a step folder")
    p.add_argument("--step", type=int, default=None, help="a specific step (default: the latest)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--chat", action="store_true", help="render each prompt as a user turn with the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--tokenizer", default=None, help="'default', a tokenizer dir or hub id (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="decode with weights cast to this dtype (default: as stored, float32)")
    p.add_argument("--show-prompt", action="store_true", help="print the rendered prompt before its completion")
    return p.parse_args(argv)


def prompt_tokens(tokenizer, text: str, *, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: the tokenizer has no chat template (use --tokenizer default, or drop --chat)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def stop_ids(tokenizer, *, chat: bool) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id}
    if chat:
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if im_end is not None and im_end != tokenizer.unk_token_id:
            ids.add(im_end)
    return tuple(sorted(i for i in ids if i is not None))


def main(argv=None) -> int:
    args = parse_args(argv)
    from doge_jax import checkpoint as ckpt
    from doge_jax.sampler import Sampler, SamplingParams
    from doge_jax.data.tokenizer import load_tokenizer

    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p)
        ref = ckpt.resolve(args.checkpoint, args.step)
        spec = args.tokenizer or ref.tokenizer_dir
        if spec is None:
            raise ValueError(f"--checkpoint={args.checkpoint!r} has no tokenizer/ folder; pass --tokenizer")
        tokenizer = load_tokenizer(spec)
        prompts = [prompt_tokens(tokenizer, p, chat=args.chat, system=args.system) for p in args.prompt]
        model = ckpt.load_model(args.checkpoint, step=args.step)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(tokenizer) > model.cfg.vocab_size:
        print(f"error: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
              f"{model.cfg.vocab_size}; pass the tokenizer it was trained with (--tokenizer)", file=sys.stderr)
        return 2
    params = SamplingParams(**{**params.__dict__, "stop_tokens": stop_ids(tokenizer, chat=args.chat)})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampler = Sampler(model, pad_id=pad_id, dtype=args.dtype)
    t0 = time.perf_counter()
    out = sampler(prompts, params, seed=args.seed)
    elapsed = time.perf_counter() - t0
    for i, (text, ids) in enumerate(zip(args.prompt, out.completions())):
        if len(args.prompt) > 1:
            print(f"--- [{i}] {'(stop)' if out.stopped[i] else '(length)'}")
        if args.show_prompt:
            print(tokenizer.decode(prompts[i], skip_special_tokens=False), end="")
        print(tokenizer.decode(ids, skip_special_tokens=True))
    n = int(out.lengths.sum())
    print(f"[{n} tokens in {elapsed:.2f}s including compilation, step {ref.step} of {ref.root}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
