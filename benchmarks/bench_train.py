"""Training throughput: doge_jax vs transformers + PyTorch on the same Doge config, batch, length and AdamW.

    python benchmarks/bench_train.py                        # CPU: Doge-20M, batch 4 × 512, fp32, interleaved
    python benchmarks/bench_train.py --rounds 5 --steps 5   # longer, steadier
    python benchmarks/bench_train.py --presets              # accelerator: every preset, jax only, bf16

The CPU comparison runs each side in its own process — doge_jax with the host-memory settings its entry point
applies on CPU (doge_jax/trainer/hostmem.py), torch as a user runs it — and alternates rounds (jax, torch, jax,
torch, ...) on the same cores so that load from other processes hits both alike; it reports the median
tokens/s of each plus their ratio. Both sides do a full
optimizer step: forward, next-token cross-entropy, backward, global-norm clipping at 1.0 and AdamW (β 0.9/0.95,
ε 1e-8, weight decay 0.01) in fp32. MFU uses doge_jax.trainer.flops (attention included); on CPU the "peak" is
the measured fp32 GEMM rate of this machine, so it reads as a fraction of what XLA's GEMM reaches here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESETS = ("doge_20m", "doge_60m", "doge_160m", "doge_320m", "doge_40m_moe")


def _config(preset: str, batch: int, seq_len: int, dtype: str):
    import importlib
    import importlib.util

    if importlib.util.find_spec("doge_jax.configs") is None:
        # A source checkout that was never pip-installed (the GPU image, with PYTHONPATH at the repo): the presets
        # import `doge_jax.configs`, which only the install maps onto configs/. Map it here the same way.
        sys.modules["doge_jax.configs"] = importlib.import_module("configs")
    config = importlib.import_module(f"configs.{preset}").get_config()
    config.batch_size, config.seq_len = batch, seq_len
    config.model.dtype = dtype
    config.total_steps, config.schedule.warmup_steps = 1000, 10
    return config


def _batch(vocab: int, batch: int, seq_len: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq_len + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


class JaxSide:
    """The trainer's own jitted step (doge_jax.trainer.step) on one device, state donated."""

    def __init__(self, config):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from doge_jax.model import decoder as model_lib
        from doge_jax.trainer import make_optimizer, make_train_step, pretrain_loss, validate

        self.cfg = validate.model_config(config.model)
        tx, schedule = make_optimizer(config)
        model = model_lib.build(self.cfg)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        self.state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
                      "rng": jax.random.key_data(jax.random.key(0))}
        self.jitted = jax.jit(make_train_step(graphdef, rest, tx, schedule, pretrain_loss), donate_argnums=0)
        self.step = self.jitted
        inputs, targets = _batch(self.cfg.vocab_size, config.batch_size, config.seq_len)
        B, T = inputs.shape
        self.batch = jax.device_put({
            "input_ids": inputs[None], "targets": targets[None], "segment_ids": np.ones((1, B, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy()})
        self.tokens = B * T

    def compile_at(self, num_micro: int):
        """The step compiled ahead of time for the same rows in num_micro micro-batches."""
        import jax

        rows = self.batch["input_ids"].shape[0] * self.batch["input_ids"].shape[1]
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_micro, rows // num_micro) + x.shape[2:], x.dtype),
                              self.batch)
        return self.jitted.lower(self.state, shapes).compile()

    def use(self, num_micro: int, compiled) -> None:
        """Run `compiled` (from compile_at(num_micro)) on the batch regrouped into num_micro micro-batches."""
        import jax

        self.batch = jax.tree.map(lambda x: x.reshape((num_micro, -1) + x.shape[2:]), self.batch)
        self.step = compiled

    def run(self, steps: int) -> float:
        import jax

        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])
        return steps * self.tokens / (time.perf_counter() - start)


class TorchSide:
    """transformers' DogeForCausalLM (the same config through the converter's mapping) + torch AdamW."""

    def __init__(self, config, jax_cfg):
        import torch
        from transformers import DogeForCausalLM

        from convert import hf

        torch.manual_seed(0)
        self.model = DogeForCausalLM(hf.config_to_hf(jax_cfg, "float32")).float().train()
        opt = config.optimizer
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps)
        inputs, targets = _batch(jax_cfg.vocab_size, config.batch_size, config.seq_len)
        self.inputs = torch.from_numpy(inputs.astype("int64"))
        self.targets = torch.from_numpy(targets.astype("int64"))
        self.tokens = inputs.size

    def run(self, steps: int) -> float:
        import torch

        start = time.perf_counter()
        for _ in range(steps):
            logits = self.model(self.inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     self.targets.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return steps * self.tokens / (time.perf_counter() - start)


def worker(args) -> None:
    """One side in its own process: builds, warms up, then answers `run N` lines with tokens/s."""
    if args.worker == "jax" or args.torch_malloc_tuning:
        from doge_jax.trainer import hostmem

        hostmem.keep_freed_memory()  # what `python -m doge_jax.train` does on a CPU-only host
    import torch

    torch.set_num_threads(os.cpu_count())
    config = _config(args.preset, args.batch, args.seq_len, "float32")
    jx = JaxSide(config)
    side = jx if args.worker == "jax" else TorchSide(config, jx.cfg)
    if side is not jx:
        del jx
    side.run(1)  # compile / warm up
    print("ready", flush=True)
    for line in sys.stdin:
        print(f"{side.run(int(line.split()[1])):.3f}", flush=True)


def compare_cpu(args) -> None:
    """Each side in its own process, as a user would run it (torch with glibc's defaults unless
    --torch-malloc-tuning), alternating rounds so that load from other processes hits both alike."""
    import subprocess

    import jax
    import torch

    from doge_jax.trainer import flops, validate

    cmd = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len)] + (["--torch-malloc-tuning"] if args.torch_malloc_tuning else [])
    procs = {}
    for side in ("jax", "torch"):  # built one after the other: compiling is not what we measure
        procs[side] = subprocess.Popen(cmd + ["--worker", side], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
        assert procs[side].stdout.readline().strip() == "ready", side
    model_cfg = validate.model_config(_config(args.preset, args.batch, args.seq_len, "float32").model)
    fpt = flops.flops_per_token(model_cfg, args.seq_len)
    print(f"{args.preset}: batch {args.batch} x {args.seq_len}, fp32, AdamW, {os.cpu_count()} CPU threads, "
          f"jax {jax.__version__} (host malloc tuning on, as the trainer), torch {torch.__version__} (malloc "
          f"tuning {'on' if args.torch_malloc_tuning else 'off'}); {fpt / 1e6:.1f} MFLOP/token", flush=True)
    rates = {"jax": [], "torch": []}
    for r in range(args.rounds):
        for side, proc in procs.items():
            proc.stdin.write(f"run {args.steps}\n")
            proc.stdin.flush()
            rates[side].append(float(proc.stdout.readline()))
        print(f"  round {r + 1}: doge_jax {rates['jax'][-1]:,.0f} tok/s | transformers+torch "
              f"{rates['torch'][-1]:,.0f} tok/s", flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    peak = flops.peak_flops(jax.devices()[0])
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k in ("jax", "torch"):
        print(f"{k:>5}: median {med[k]:,.0f} tokens/s, {med[k] * fpt / 1e9:.1f} GFLOP/s, "
              f"MFU {100 * med[k] * fpt / peak:.1f}% of a measured {peak / 1e9:.0f} GFLOP/s GEMM rate")
    print(f"ratio doge_jax / transformers+torch = {med['jax'] / med['torch']:.2f}x "
          f"(per round: {', '.join(f'{a / b:.2f}' for a, b in zip(rates['jax'], rates['torch']))})")


def presets(args) -> None:
    import jax

    from doge_jax.trainer import flops

    device = jax.devices()[0]
    print(f"{device.device_kind}: batch {args.batch} x {args.seq_len}, {args.dtype} compute, fp32 master weights")
    for preset in PRESETS:
        config = _config(preset, args.batch, args.seq_len, args.dtype)
        jx = JaxSide(config)
        jx.run(2)
        rate = statistics.median(jx.run(args.steps) for _ in range(args.rounds))
        fpt = flops.flops_per_token(jx.cfg, args.seq_len)
        peak = flops.peak_flops(device, args.dtype)
        mfu = f"{100 * rate * fpt / peak:.1f}%" if peak else "n/a"
        print(f"{preset:>14}: {rate:,.0f} tokens/s, {rate * fpt / 1e12:.1f} TFLOP/s, MFU {mfu}", flush=True)
        del jx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="doge_20m", choices=PRESETS)
    parser.add_argument("--batch", type=int, default=None, help="default 4 (CPU) / 32 (--presets)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 512 (CPU) / 2048 (--presets)")
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--presets", action="store_true", help="every preset, doge_jax only (for a GPU/TPU)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype for --presets")
    parser.add_argument("--torch-malloc-tuning", action="store_true",
                        help="give torch's process the trainer's host-memory settings too (hostmem.py)")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (32 if args.presets else 4)
    args.seq_len = args.seq_len or (2048 if args.presets else 512)
    if args.worker:
        worker(args)
    else:
        (presets if args.presets else compare_cpu)(args)


if __name__ == "__main__":
    main()
