"""Serving benchmark: the server (static and dynamic decode paths, float32 and int8) against raw `model.generate`
and doge-jax's sampler on the same weights, with 1-16 concurrent streaming clients, in one run.

    python benchmarks/bench_serve.py                              # Doge-20M and Doge-60M shapes, everything
    python benchmarks/bench_serve.py --shapes 20m --clients 1,8 --repeats 3
    python benchmarks/bench_serve.py --compile-check --shapes 20m # + the hand-written step vs torch.compile of it
    python benchmarks/bench_serve.py --layout-check               # only the linears: row/column-major, packed

Models: each preset's shape (configs/doge_20m.py, configs/doge_60m.py) with its real 32,768 vocab, random weights
(`A` drawn from N(0, 0.5) so the DMA mask varies), built in JAX, exported with `convert.to_hf`, plus an offline
BPE tokenizer padded with added tokens to the full vocab. Every request decodes exactly `--tokens` tokens
greedily (`ignore_eos`), as `generate(min_new_tokens=N)` and the sampler do. Clients are asyncio + httpx streams
in this process; tokens/s per client counts from request sent to last token (queueing and prefill included), as
the baselines' end-to-end figures do; aggregate = all tokens / wall time of the round. Each figure is the median
of `--repeats` rounds. Baselines run at batch 1: `generate` with the faster of 1 and all torch threads, the
sampler with XLA's own threads. The server runs one torch thread (its default on 2 cores, the other core serves
HTTP). int8 top-1 agreement: argmax of the int8 and float32 transformers models over a held-out text (stdlib
docstrings the tokenizer never saw), teacher-forced; with random weights the logits are nearly flat, so this is
a harsh measure (tests/test_serve_compiled.py measures a trained model).

Goals (issue 16), checked at the end on Doge-20M: 1 client >= 3x raw generate and >= 1.0x the sampler (static,
float32); 8 clients >= 4x the 1-client aggregate; int8 >= 1.6x float32 at 1 client with top-1 agreement >= 99 %.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # serve_testing: the offline tokenizer the tests use

SHAPES = {"20m": "configs/doge_20m.py", "60m": "configs/doge_60m.py"}
PROMPT = "Write a short story about a small dog who learns to read the documentation of a parser."
VARIANTS = {  # name: server flags
    "dynamic fp32": ["--decode-path", "dynamic"],
    "static fp32": ["--decode-path", "static"],
    "static int8": ["--decode-path", "static", "--quantize", "int8"],
}


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", REPO / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(shape: str, root: Path):
    """(hf_dir, jax_model, param count) of a random model in `shape`, with a tokenizer covering its vocab."""
    from convert import to_hf
    from doge_jax import checkpoint as ckpt
    from doge_jax.model import decoder as model_lib
    from doge_jax.model.config import DogeConfig
    from serve_testing import make_tokenizer

    cfg = DogeConfig.from_dict(load_config(SHAPES[shape]).model.to_dict())
    model = model_lib.build(cfg, seed=0)
    params = ckpt.params_of(model)
    rng = np.random.default_rng(0)
    for layer in params["layers"].values():
        layer["self_attn"]["A"] = rng.normal(0.0, 0.5, layer["self_attn"]["A"].shape).astype(np.float32)
    run = root / f"{shape}-run"
    ckpt.save_params(str(run), 0, params, cfg)
    hf_dir = Path(to_hf(str(run), str(root / f"doge-{shape}")))
    tokenizer = make_tokenizer(vocab_size=8192)
    tokenizer.add_tokens([f"<x{i}>" for i in range(len(tokenizer), cfg.vocab_size)])
    tokenizer.save_pretrained(hf_dir)
    return hf_dir, ckpt.load_model(str(run)), model_lib.count_params(cfg)


class Baselines:
    """Raw `generate` and doge-jax's sampler, batch 1, on the chat-templated prompt."""

    def __init__(self, hf_dir: Path, jax_model, tokens: int):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from doge_jax.sampler import Sampler

        transformers.logging.set_verbosity_error()  # generate's max_length notice, once per call
        transformers.utils.logging.disable_progress_bar()
        self.torch, self.tokens = torch, tokens
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                  add_generation_prompt=True)
        self.ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        self.sampler = Sampler(jax_model, pad_id=0)
        for n in (1, tokens):  # compile / warm up both sides
            self._jax(n)
            self._hf(n)
        self.same_tokens = bool((self._jax_tokens(tokens) == self._hf_tokens(tokens)).all())

    def _hf_tokens(self, n: int) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0, eos_token_id=None)
        return out[0, self.ids.shape[1] :].numpy()

    def _jax_tokens(self, n: int) -> np.ndarray:
        from doge_jax.sampler import SamplingParams

        return np.asarray(self.sampler([self.ids[0].tolist()], SamplingParams(max_new_tokens=n)).tokens)[0, :n]

    def _hf(self, n: int) -> float:
        t0 = time.perf_counter()
        assert len(self._hf_tokens(n)) == n
        return time.perf_counter() - t0

    def _jax(self, n: int) -> float:
        t0 = time.perf_counter()
        assert len(self._jax_tokens(n)) == n
        return time.perf_counter() - t0

    def measure(self, threads: int) -> dict:
        best = None
        for t in sorted({1, threads}):
            self.torch.set_num_threads(t)
            r = {"ttft": self._hf(1), "tok_s": self.tokens / self._hf(self.tokens), "threads": t}
            best = r if best is None or r["tok_s"] > best["tok_s"] else best
        return {"generate": best, "sampler": {"ttft": self._jax(1), "tok_s": self.tokens / self._jax(self.tokens)}}


def int8_agreement(hf_dir: Path) -> dict:
    """int8 vs float32 logits of the transformers model over held-out text, teacher-forced."""
    import email
    import http
    import inspect

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve.quantize import quantize_linears

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    text = "\n\n".join(filter(None, (inspect.getdoc(o) for m in (email, http) for _, o in inspect.getmembers(m))))
    ids = torch.tensor(tokenizer(text)["input_ids"][: 4 * 256]).view(4, 256)  # [B, T]
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    quantized = copy.deepcopy(model)
    quantize_linears(quantized)
    with torch.inference_mode():
        ref, got = model(ids).logits, quantized(ids).logits  # [B, T, V]
    err = (got - ref).abs()
    return {"top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean()), "max": float(err.max()),
            "mean": float(err.mean()), "logit": float(ref.abs().mean()), "positions": ids.numel()}


async def one_client(client, url: str, tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, completion = None, 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None and '"content":"' in line and '"role"' not in line:
                ttft = time.perf_counter() - t0
            if '"usage":{' in line:
                completion = json.loads(line[6:])["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "total": total, "tokens": completion}


async def round_of(base: str, clients: int, tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=900) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one_client(client, base + "/v1/chat/completions", tokens)
                                         for _ in range(clients)])
        wall = time.perf_counter() - t0
    assert all(r["tokens"] == tokens for r in results), results
    return {"ttft": statistics.median(r["ttft"] for r in results),
            "per_client": statistics.median(r["tokens"] / r["total"] for r in results),
            "aggregate": sum(r["tokens"] for r in results) / wall}


class Server:
    def __init__(self, hf_dir: Path, flags: list[str], log_path: Path):
        import httpx

        self.base = f"http://127.0.0.1:{free_port()}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "--model", str(hf_dir), "--port", self.base.rsplit(":", 1)[1],
             "--served-model-name", "bench", "--log-level", "info", "--max-batch", "16", *flags],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        while True:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 600 or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        self.ready_s = time.perf_counter() - t0
        found = re.search(r"warm-up done in ([0-9.]+) s", log_path.read_text())
        self.warmup_s = float(found.group(1)) if found else float("nan")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def compile_check(hf_dir: Path, tokens: int) -> None:
    """The hand-written decode step, eager vs `torch.compile` of the same function, batch 1, one thread."""
    import types

    import torch
    from transformers import AutoModelForCausalLM

    from serve.decode_step import DecodeStep

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    step = DecodeStep(model)
    plain = DecodeStep.__call__.__wrapped__  # without inference_mode: dynamo cannot trace inference tensors
    K, H, cap = step.kv_heads, step.head_dim, 512

    def run(fn) -> float:
        cache = types.SimpleNamespace(keys=[torch.zeros(1, K, cap, H) for _ in step.layers],
                                      values=[torch.zeros(1, K, cap, H) for _ in step.layers],
                                      dts=[torch.zeros(1, K, cap) for _ in step.layers])
        token, rows = torch.tensor([5]), torch.tensor([0])
        t0 = time.perf_counter()
        with torch.no_grad():
            for p in range(tokens):
                token = fn(step, token, torch.tensor([p]), cache, rows, p + 1).argmax(-1)
        return tokens / (time.perf_counter() - t0)

    eager = [run(plain) for _ in range(3)]
    compiled_fn = torch.compile(plain, dynamic=True)
    t0 = time.perf_counter()
    run(compiled_fn)
    first_s = time.perf_counter() - t0
    compiled = [run(compiled_fn) for _ in range(3)]
    compile_s = first_s - tokens / statistics.median(compiled)
    print(f"compile check ({hf_dir.name}, batch 1, 1 thread, {tokens} tokens): eager step "
          f"{statistics.median(eager):.1f} tok/s, torch.compile(dynamic=True) {statistics.median(compiled):.1f} "
          f"tok/s after ~{compile_s:.0f} s compiling -> ratio {statistics.median(compiled) / statistics.median(eager):.2f}x",
          flush=True)


def layout_check(hf_dir: Path, threads: int) -> None:
    """Small-batch float32 linears three ways: MKL on the row-major weight (F.linear as transformers has it), MKL
    on a column-major copy (W^T contiguous), and oneDNN on its packed layout (serve/packed_linear.py, the static
    path's default): per weight shape of the model at batch 1 and 8, streaming through enough copies to leave the
    cache as a decode step does; then the whole decode step each way at batch 1 and 8; at 1 and `threads` torch
    threads."""
    import torch
    from transformers import AutoModelForCausalLM

    from serve import packed_linear
    from serve.decode_step import DecodeStep
    from serve.kv_batch import KVBatch
    from serve.static_cache import SlotBatch

    def timed(fn, n) -> float:
        for i in range(n):
            fn(i)
        t0 = time.perf_counter()
        for _ in range(3):
            for i in range(n):
                fn(i)
        return (time.perf_counter() - t0) / (3 * n) * 1e3

    def step_ms(layout: str, rows: int) -> float:
        model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        step = DecodeStep(model, packed=layout == "packed")
        if layout == "row":  # undo the column-major layout: the same step on contiguous [O, I] weights
            for lay in step.layers:
                for fused in (lay.qkv, lay.gate_up):
                    fused.weight = fused.weight.contiguous()
                for linear in (lay.attn.o_proj, lay.layer.mlp.down_proj):
                    linear.weight = torch.nn.Parameter(linear.weight.detach().contiguous(), requires_grad=False)
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().contiguous(), requires_grad=False)
        batch = SlotBatch(step, rows, 512)
        prefill, logits = KVBatch(model).prefill([list(range(5 + r, 40 + r)) for r in range(rows)])
        batch.merge(prefill)
        tokens = [int(t) for t in logits.argmax(-1)]
        return timed(lambda _: batch.decode(tokens), 40)

    config = AutoModelForCausalLM.from_pretrained(hf_dir).config
    D, F_ = config.hidden_size, config.intermediate_size
    H = getattr(config, "head_dim", None) or D // config.num_attention_heads
    shapes = {"qkv": ((config.num_attention_heads + 2 * config.num_key_value_heads) * H, D), "o_proj": (D, D),
              "gate_up": (2 * F_, D), "down": (D, F_), "lm_head": (config.vocab_size, D)}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        for rows in (1, 8):
            cells = []
            with torch.inference_mode():
                for name, (O, I) in shapes.items():
                    n = max(4, int(200e6 / (O * I * 4)))
                    dense = [torch.randn(O, I) for _ in range(n)]
                    cols = [w.t().contiguous().t() for w in dense]
                    x = torch.randn(rows, I)
                    r = timed(lambda i: torch.nn.functional.linear(x, dense[i]), n)
                    c = timed(lambda i: torch.nn.functional.linear(x, cols[i]), n)
                    cell = f"{name} [{O},{I}] {r * 1e3:.0f}/{c * 1e3:.0f}"
                    if packed_linear.available():
                        del cols
                        packed = [packed_linear.PackedLinear(w, None) for w in dense]
                        cell += f"/{timed(lambda i: packed[i](x), n) * 1e3:.0f}"
                    cells.append(cell + " us")
            layouts = ["row", "column"] + (["packed"] if packed_linear.available() else [])
            steps = {layout: step_ms(layout, rows) for layout in layouts}
            print(f"layout check ({hf_dir.name}, {t} thread(s), batch {rows}), {'/'.join(layouts)}: "
                  + "; ".join(cells) + "; decode step " + " / ".join(f"{v:.2f}" for v in steps.values())
                  + f" ms ({steps['row'] / min(steps.values()):.2f}x best vs row-major)", flush=True)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="20m,60m")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"server variants, from {list(VARIANTS)}")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--clients", default="1,2,4,8,16")
    p.add_argument("--repeats", type=int, default=3, help="rounds per client count (medians are reported)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--compile-check", action="store_true")
    p.add_argument("--layout-check", action="store_true", help="time the linear weight layouts, then exit")
    args = p.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    variants = args.variants.split(",")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"cpu: {cpu}, {len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f} at start "
          "(other jobs on the box inflate every figure); "
          f"tokens/request {args.tokens}; medians of {args.repeats} rounds", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve.")
    goals = []
    try:
        for shape in args.shapes.split(","):
            hf_dir, jax_model, n_params = build(shape, Path(tmp.name))
            if args.compile_check:
                compile_check(hf_dir, 64)
            if args.layout_check:
                layout_check(hf_dir, args.threads)
                continue
            base = Baselines(hf_dir, jax_model, args.tokens)
            agreement = int8_agreement(hf_dir) if "static int8" in variants else None
            # Every server starts first (an idle server blocks on a condition, using no CPU); then each repeat
            # measures the baselines and every server's rounds back to back, so load drifting on a shared box
            # hits all sides of a ratio alike.
            servers = {}
            try:
                for variant in variants:
                    log = Path(tmp.name) / f"{shape}-{variant.replace(' ', '-')}.log"
                    servers[variant] = Server(hf_dir, VARIANTS[variant], log)
                    asyncio.run(round_of(servers[variant].base, 2, 8))  # first-request effects
                raw, rounds = [], {(v, c): [] for v in variants for c in counts}
                for _ in range(args.repeats):
                    raw.append(base.measure(args.threads))
                    for variant in variants:
                        for c in counts:
                            rounds[variant, c].append(asyncio.run(round_of(servers[variant].base, c, args.tokens)))
                rss = {v: s.peak_rss_mib() for v, s in servers.items()}
            finally:
                for server in servers.values():
                    server.stop()
            gen = statistics.median(r["generate"]["tok_s"] for r in raw)
            smp = statistics.median(r["sampler"]["tok_s"] for r in raw)
            print(f"\n== Doge-{shape.upper()} shape: {n_params / 1e6:.1f}M params, vocab 32768, prompt "
                  f"{base.ids.shape[1]} tokens (sampler and generate give the same tokens: {base.same_tokens})")
            print(f"raw generate (batch 1, {raw[0]['generate']['threads']} thread(s)): {gen:.1f} tok/s, first token "
                  f"{statistics.median(r['generate']['ttft'] for r in raw) * 1e3:.0f} ms; doge-jax sampler: "
                  f"{smp:.1f} tok/s, first token {statistics.median(r['sampler']['ttft'] for r in raw) * 1e3:.0f} ms")
            if agreement:
                print(f"int8 vs fp32 logits, held-out text ({agreement['positions']} positions, mean |logit| "
                      f"{agreement['logit']:.3f}): top-1 agreement {agreement['top1'] * 100:.1f} %, max |dlogit| "
                      f"{agreement['max']:.4f}, mean {agreement['mean']:.5f}")
            del base
            print(f"{'server':>13} {'clients':>7} {'TTFT p50':>9} {'tok/s/client':>12} {'aggregate':>10} "
                  f"{'x generate':>10} {'x sampler':>9} {'x 1 client':>10} {'x dynamic':>9}", flush=True)
            table = {}
            for variant in variants:
                for c in counts:
                    m = {k: statistics.median(r[k] for r in rounds[variant, c])
                         for k in ("ttft", "per_client", "aggregate")}
                    table[variant, c] = m
                    one = table[variant, counts[0]]["aggregate"]
                    dyn = table.get(("dynamic fp32", c))
                    print(f"{variant:>13} {c:>7} {m['ttft'] * 1e3:>7.0f}ms {m['per_client']:>12.1f} "
                          f"{m['aggregate']:>10.1f} {m['aggregate'] / gen:>9.2f}x {m['aggregate'] / smp:>8.2f}x "
                          f"{m['aggregate'] / one:>9.2f}x "
                          f"{(m['aggregate'] / dyn['aggregate']) if dyn else float('nan'):>8.2f}x")
                server = servers[variant]
                print(f"{variant:>13}: ready {server.ready_s:.1f} s after launch (warm-up {server.warmup_s:.2f} s), "
                      f"peak RSS {rss[variant]:.0f} MiB", flush=True)
            if shape == "20m" and 1 in counts:
                fp32 = table.get(("static fp32", 1))
                if fp32:
                    goals.append(("1 client >= 3x raw generate", fp32["aggregate"] / gen, 3.0))
                    goals.append(("1 client >= 1.0x doge-jax sampler", fp32["aggregate"] / smp, 1.0))
                    if ("static fp32", 8) in table:
                        goals.append(("8 clients >= 4x 1 client", table["static fp32", 8]["aggregate"]
                                      / fp32["aggregate"], 4.0))
                if fp32 and ("static int8", 1) in table:
                    goals.append(("int8 >= 1.6x fp32 at 1 client", table["static int8", 1]["aggregate"]
                                  / fp32["aggregate"], 1.6))
                    goals.append(("int8 top-1 agreement >= 99 %", agreement["top1"], 0.99))
        if goals:
            print("\nGoals (Doge-20M, static decode path):")
            for name, value, target in goals:
                print(f"  {name:36s} {value:6.3f}  {'met' if value >= target else 'NOT met'}")
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    main()
