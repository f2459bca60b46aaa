"""Decode throughput of doge_jax.sampler vs transformers' `generate` on the same weights and the same CPU.

    python benchmarks/bench_sampler.py                      # Doge-20M preset, batch 1, 32-token prompt, 256 new
    python benchmarks/bench_sampler.py --config configs/doge_20m.py --batch 4 --new-tokens 128

Weights are random (the preset's shape, `A` drawn from N(0, 0.5) so the DMA mask varies). Both sides decode
greedily for exactly --new-tokens tokens (no stop token), in float32; the script checks that the two produce the
same tokens. Timings exclude compilation and model loading; each side reports the best of --repeats runs, and
decode tok/s = batch · (new tokens − 1) / (time of the whole call − time of a 1-token call), so prefill is not
counted as decode on either side.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/doge_20m.py")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute and weight dtype of both sides (weights are float32 on disk)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = p.parse_args(argv)

    import jax
    import torch
    from transformers import AutoModelForCausalLM

    import convert
    from doge_jax import checkpoint as ckpt
    from doge_jax.model import decoder as model_lib
    from doge_jax.model.config import DogeConfig
    from doge_jax.sampler import Sampler, SamplingParams, left_pad

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DogeConfig.from_dict(load_config(args.config).model.to_dict())
    model = model_lib.build(cfg, seed=0)
    params = ckpt.params_of(model)
    rng = np.random.default_rng(0)
    for layer in params["layers"].values():
        layer["self_attn"]["A"] = rng.normal(0.0, 0.5, layer["self_attn"]["A"].shape).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_params(os.path.join(tmp, "run"), 0, params, cfg)
        hf_dir = convert.to_hf(os.path.join(tmp, "run"), os.path.join(tmp, "hf"))
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, args.dtype)).eval()
        jax_model = ckpt.load_model(os.path.join(tmp, "run"))

    prompts = [rng.permutation(cfg.vocab_size)[: args.prompt_len].tolist() for _ in range(args.batch)]
    ids, mask = left_pad(prompts, 0)
    sampler = Sampler(jax_model, pad_id=0, dtype=args.dtype)
    N = args.new_tokens

    def run_jax(n):
        return sampler(prompts, SamplingParams(max_new_tokens=n)).tokens

    def run_hf(n):
        with torch.no_grad():
            out = hf_model.generate(torch.from_numpy(ids.astype(np.int64)),
                                    attention_mask=torch.from_numpy(mask.astype(np.int64)), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, ids.shape[1]:].numpy()

    jax_tokens, hf_tokens = run_jax(N), run_hf(N)  # also compiles / warms up
    run_jax(1)
    same = bool((jax_tokens == hf_tokens).all())
    results = {}
    for name, fn in (("doge_jax.sampler", run_jax), ("transformers.generate", run_hf)):
        full = best_time(lambda: fn(N), args.repeats)
        prefill = best_time(lambda: fn(1), args.repeats)
        results[name] = (args.batch * (N - 1) / (full - prefill), args.batch * N / full)
    print(f"config={args.config} params={model_lib.count_params(cfg) / 1e6:.1f}M batch={args.batch} "
          f"prompt={args.prompt_len} new_tokens={N} dtype={args.dtype} jax={jax.__version__} torch={torch.__version__} "
          f"torch_threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    for name, (decode, overall) in results.items():
        print(f"  {name:24s} decode {decode:8.1f} tok/s   end-to-end {overall:8.1f} tok/s")
    jx, hf = results["doge_jax.sampler"][0], results["transformers.generate"][0]
    print(f"  speedup (decode) {jx / hf:.2f}x   greedy tokens identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
