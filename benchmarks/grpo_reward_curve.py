"""GRPO on a toy verifiable task, on CPU: the reward per step, before and after.

    python benchmarks/grpo_reward_curve.py --workdir /tmp/grpo_curve          # ~15 min on 2 cores

1. SFT from scratch (configs/tiny_sft.py's model, 4 layers) on the built-in arithmetic chats, just long enough
   to learn the answer format and some sums ("a + b = c. The answer is c.");
2. GRPO from that checkpoint (configs/tiny_grpo.py) on a pool of --train-prompts arithmetic problems (several
   passes over it), rewards format + answer;
3. greedy answer accuracy on the pool and on 128 unseen problems, before and after GRPO (KV-cache sampler).

Prints the per-step mean sampled reward (T = 1, over batch · group completions) and writes every number to
WORKDIR/reward_curve.json. Runs through the same Trainer and stage code as `python -m doge_jax.train`.
With a few hundred CPU steps the reward rises on the problems GRPO practises; expect little transfer to unseen
problems at this model size (the script reports both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def greedy_accuracy(workdir: str, recs: list[dict]) -> dict:
    from doge_jax import checkpoint as ckpt
    from doge_jax.posttrain import chat, rewards
    from doge_jax.sampler import Sampler, SamplingParams
    from doge_jax.data.tokenizer import load_tokenizer

    ref = ckpt.resolve(workdir)
    tok = load_tokenizer(ref.tokenizer_dir)
    prompts = [chat.encode_prompt(tok, r["prompt"]).tolist() for r in recs]
    out = Sampler(ckpt.load_model(workdir), pad_id=tok.pad_token_id)(
        prompts, SamplingParams(max_new_tokens=24, stop_tokens=(tok.eos_token_id,)))
    texts = [tok.decode(c, skip_special_tokens=True) for c in out.completions()]
    scores = rewards.score(texts, recs, ["format", "answer"])
    return {"format": float(scores[:, 0].mean()), "answer": float(scores[:, 1].mean()), "example": texts[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--grpo-steps", type=int, default=60)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16, help="prompts per GRPO step")
    p.add_argument("--train-prompts", type=int, default=256, help="size of the GRPO problem pool")
    p.add_argument("--lr", type=float, default=3e-4, help="GRPO learning rate")
    p.add_argument("--kl-coef", type=float, default=0.1)
    p.add_argument("--eval-prompts", type=int, default=128)
    args = p.parse_args(argv)

    from configs import tiny_grpo, tiny_pretrain, tiny_sft
    from doge_jax.posttrain import datasets
    from doge_jax.posttrain import trainer_kwargs
    from doge_jax.trainer import Trainer
    from doge_jax.trainer.metrics import METRICS_FILE, read_jsonl

    sft_dir, grpo_dir = os.path.join(args.workdir, "sft"), os.path.join(args.workdir, "grpo")
    t0 = time.time()
    if not os.path.isdir(os.path.join(sft_dir, "checkpoints")):
        config = tiny_sft.get_config()
        config.model.num_hidden_layers = 4
        config.posttrain.dataset = "builtin:arith"
        config.batch_size = 32
        tiny_pretrain.tiny_run(config, steps=args.sft_steps, lr=3e-3)
        config.schedule.decay_steps = args.sft_steps // 5
        Trainer(config, sft_dir, **trainer_kwargs(config)).run()
    sft_time = time.time() - t0
    pool = datasets.arith_prompts(num=args.train_prompts, seed=7)
    unseen = datasets.arith_prompts(num=args.eval_prompts, seed=12345)
    pool_path = os.path.join(args.workdir, "grpo_prompts.jsonl")
    with open(pool_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in pool)
    before = {"pool": greedy_accuracy(sft_dir, pool), "unseen": greedy_accuracy(sft_dir, unseen)}
    print(f"after SFT ({sft_time:.0f}s): greedy answer accuracy pool {before['pool']['answer']:.3f}, unseen "
          f"{before['unseen']['answer']:.3f}; e.g. {before['unseen']['example']!r}", flush=True)

    config = tiny_grpo.get_config()
    config.init_from = sft_dir
    config.posttrain.dataset = pool_path
    config.posttrain.eval_fraction = 0.0
    config.grpo.group_size = args.group_size
    config.grpo.kl_coef = args.kl_coef
    config.batch_size = args.prompts
    tiny_pretrain.tiny_run(config, steps=args.grpo_steps, lr=args.lr)
    config.log_every = 1
    t1 = time.time()
    Trainer(config, grpo_dir, **trainer_kwargs(config)).run()
    grpo_time = time.time() - t1
    after = {"pool": greedy_accuracy(grpo_dir, pool), "unseen": greedy_accuracy(grpo_dir, unseen)}
    curve = [{k: r[k] for k in ("step", "reward", "reward_answer", "reward_format", "kl", "completion_len")}
             for r in read_jsonl(os.path.join(grpo_dir, METRICS_FILE))]

    print("step  reward  answer  format  kl")
    for r in curve:
        print(f"{r['step']:4d}  {r['reward']:.3f}   {r['reward_answer']:.3f}   {r['reward_format']:.3f}   "
              f"{r['kl']:.4f}")
    k = max(1, len(curve) // 4)
    first = sum(r["reward"] for r in curve[:k]) / k
    last = sum(r["reward"] for r in curve[-k:]) / k
    print(f"mean sampled reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({grpo_time:.0f}s)")
    for name in ("pool", "unseen"):
        print(f"greedy answer accuracy, {name} ({len(pool if name == 'pool' else unseen)} problems): "
              f"{before[name]['answer']:.3f} -> {after[name]['answer']:.3f} "
              f"(format {before[name]['format']:.3f} -> {after[name]['format']:.3f})")
    with open(os.path.join(args.workdir, "reward_curve.json"), "w") as f:
        json.dump({"args": vars(args), "curve": curve, "greedy_before": before, "greedy_after": after,
                   "sft_seconds": sft_time, "grpo_seconds": grpo_time}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
