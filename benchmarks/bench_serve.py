"""Serving benchmark, one run: raw `model.generate` (float32 and bfloat16), doge-jax's sampler, and the server
at float32 / bfloat16 / int8, with 1, 2, 8 and 16 concurrent streaming clients, on the same weights.

    python benchmarks/bench_serve.py                              # Doge-20M and Doge-60M shapes, everything
    python benchmarks/bench_serve.py --shapes 20m --clients 1,8 --repeats 3
    python benchmarks/bench_serve.py --threads-check --shapes 20m # the decode step: threads x OpenMP wait policy
    python benchmarks/bench_serve.py --compile-check --shapes 20m # the decode step eager vs --compile
    python benchmarks/bench_serve.py --layout-check               # only the float32 linears: row/column-major, packed

Models: each preset's shape (configs/doge_20m.py, configs/doge_60m.py) with its real 32,768 vocab, random weights
(`A` drawn from N(0, 0.5) so the DMA mask varies), built in JAX, exported with `convert.to_hf`, plus an offline
BPE tokenizer padded with added tokens to the full vocab. Every request decodes exactly `--tokens` tokens
greedily (`ignore_eos`), as `generate(min_new_tokens=N)` and the sampler do. Clients are asyncio + httpx streams
in this process; tokens/s per client counts from request sent to last token (queueing and prefill included), as
the baselines' end-to-end figures do; aggregate = all tokens / wall time of the round. Throughput figures are
medians of `--repeats` rounds; TTFT p50 / p99 are over every request of every round (with few requests, p99 is
close to the maximum). Baselines run at batch 1: `generate` with the faster of 1 and all torch threads (float32,
and a model loaded in bfloat16), the sampler with XLA's own threads. Servers run their defaults: torch on every
core with OpenMP waiting passively after a short spin; this process sets the same (`OMP_WAIT_POLICY=PASSIVE`,
`GOMP_SPINCOUNT=10000`) before torch loads, so
`generate` gets the same (it gains from it on a shared box). Peak RSS is the server process's VmHWM.

Quality: (1) a tiny Doge trained briefly on stdlib prose (tests/serve_testing.train_tiny_doge), teacher-forced
over the pydoc eval text (CPython's test-suite docstrings, doge_jax's `pydoc_ppl` documents): top-1 agreement
with float32, also over the positions where float32's top two logits differ by >= 0.1 (below that, ties flip
under any rounding), and perplexity; int8 per kernel, its LM head's leading logits recomputed in float32 as the
server does (serve/exact_head.py). (2) The random-weight benchmark model over held-out stdlib
prose: near-flat logits make this a harsh measure.

Goals (issue 24), checked at the end: Doge-20M, 1 client >= 3x generate float32 and >= 1.0x the sampler; int8 >=
1.6x float32 at 1 client and >= float32 at 8 and 16 clients, with top-1 agreement >= 99 % and perplexity within
1 % on the trained tiny model; 8 clients >= 4x 1 client; Doge-60M, 1 client >= 2.5x generate. "Server" is the
default (`--dtype auto`: bfloat16 on a CPU with avx512_bf16 or AMX); float32 and int8 are shown beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import json
import math
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

if "OMP_WAIT_POLICY" not in os.environ:  # before numpy/torch load an OpenMP runtime: the server's default (see
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # serve/__main__.py), for `generate` here and the servers started
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # serve_testing: the offline tokenizer the tests use

SHAPES = {"20m": "configs/doge_20m.py", "60m": "configs/doge_60m.py"}
PROMPT = "Write a short story about a small dog who learns to read the documentation of a parser."
VARIANTS = {  # name: server flags
    "fp32": ["--dtype", "float32"],
    "bf16": ["--dtype", "bfloat16"],
    "int8": ["--quantize", "int8"],
    "bf16 compiled": ["--dtype", "bfloat16", "--compile"],  # serve/compiled.py: minutes to start on 2 cores
    "int8 compiled": ["--quantize", "int8", "--compile"],
    "dynamic fp32": ["--decode-path", "dynamic", "--dtype", "float32"],  # the model's own forward every step
}
DEFAULT_VARIANTS = "fp32,bf16,int8"


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
    """Raw `generate` (float32, and the model loaded in bfloat16) and doge-jax's sampler, batch 1, on the
    chat-templated prompt."""

    def __init__(self, hf_dir: Path, jax_model, tokens: int):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from doge_jax.sampler import Sampler

        transformers.logging.set_verbosity_error()  # generate's max_length notice, once per call
        transformers.utils.logging.disable_progress_bar()
        self.torch, self.tokens = torch, tokens
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.models = {"fp32": AutoModelForCausalLM.from_pretrained(hf_dir).eval(),
                       "bf16": AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()}
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                  add_generation_prompt=True)
        self.ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        self.sampler = Sampler(jax_model, pad_id=0)
        for n in (1, tokens):  # compile / warm up every side
            self._jax(n)
            for dtype in self.models:
                self._hf(dtype, n)
        self.same_tokens = bool((self._jax_tokens(tokens) == self._hf_tokens("fp32", tokens)).all())

    def _hf_tokens(self, dtype: str, n: int) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.models[dtype].generate(self.ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                              pad_token_id=0, eos_token_id=None)
        return out[0, self.ids.shape[1] :].numpy()

    def _jax_tokens(self, n: int) -> np.ndarray:
        from doge_jax.sampler import SamplingParams

        return np.asarray(self.sampler([self.ids[0].tolist()], SamplingParams(max_new_tokens=n)).tokens)[0, :n]

    def _hf(self, dtype: str, n: int) -> float:
        t0 = time.perf_counter()
        assert len(self._hf_tokens(dtype, n)) == n
        return time.perf_counter() - t0

    def _jax(self, n: int) -> float:
        t0 = time.perf_counter()
        assert len(self._jax_tokens(n)) == n
        return time.perf_counter() - t0

    def measure(self, threads: int) -> dict:
        out = {}
        for dtype in self.models:
            best = None
            for t in sorted({1, threads}):
                self.torch.set_num_threads(t)
                r = {"ttft": self._hf(dtype, 1), "tok_s": self.tokens / self._hf(dtype, self.tokens), "threads": t}
                best = r if best is None or r["tok_s"] > best["tok_s"] else best
            out[f"generate {dtype}"] = best
        out["sampler"] = {"ttft": self._jax(1), "tok_s": self.tokens / self._jax(self.tokens)}
        return out


def converted(model, variant: str):
    """A copy of the float32 transformers `model` with its linears as the server holds them for `variant`:
    bf16 (every linear on packed bfloat16, the bound for the server, which may keep small shapes float32; the LM
    head int8 with float32 leaders, as the server holds it, on the default table's kernel for the row count),
    int8 on one kernel ("w8a16" / "w8a8"), or "served@N": `--quantize int8` as the server measures it here (float32
    kept per shape and row count where faster, `serve/kernel_choice.py`, for up to 16 rows), every layer on the
    kernel its table gives N rows."""
    import torch

    from serve import kernel_choice
    from serve.decode_step import DecodeStep
    from serve.quantize import ANY_ROWS, Int8Linear, quantize_head, quantize_linears

    model = copy.deepcopy(model)
    if variant == "bf16":
        quantize_head(model)  # as the bfloat16 server holds it (serve/engine.py): int8, leaders in float32
        DecodeStep(model, packed=True, dtype=torch.bfloat16)
        return model
    if variant.startswith("served@"):
        quantize_linears(model, keep_float=True)
        step = DecodeStep(model)  # fuses q/k/v and gate/up as the server does; the model's forward runs them
        layers = [m for m in model.modules() if isinstance(m, Int8Linear)] + step.fused_layers(Int8Linear)
        kernel_choice.choose(layers, 16)
        rows = int(variant.removeprefix("served@"))
        for m in layers:
            m.set_table([(ANY_ROWS, m.kernel_for(rows))])
        return model
    quantize_linears(model)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.set_table([(ANY_ROWS, variant)])
    return model


def agreement(model, ids, variants: list[str]) -> dict:
    """Teacher-forced over `ids` [B, T]: per variant, top-1 agreement with float32 (all positions, and those
    where float32's top two logits differ by >= 0.1), perplexity, max |dlogit|; "fp32" holds float32's own."""
    import torch

    def run(m):
        with torch.inference_mode():
            logits = m(ids).logits.float()  # [B, T, V]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return logits, float(torch.exp(nll))

    ref, ppl = run(model)
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) >= 0.1
    out = {"fp32": {"ppl": ppl, "positions": ids.numel(), "decided": float(decided.float().mean()),
                    "logit": float(ref.abs().mean())}}
    for variant in variants:
        logits, vppl = run(converted(model, variant))
        same = logits.argmax(-1) == ref.argmax(-1)
        out[variant] = {"top1": float(same.float().mean()), "top1_decided": float(same[decided].float().mean()),
                        "ppl": vppl, "max": float((logits - ref).abs().max())}
    return out


def int8_kernels() -> list[str]:
    from serve.quantize import available

    return list(available())


def quality_on_trained_model() -> dict:
    """`agreement` for bf16 and each int8 kernel on a tiny Doge trained on stdlib prose, over the pydoc eval text."""
    import torch

    from serve_testing import pydoc_eval_text, train_tiny_doge

    model, tokenizer = train_tiny_doge()
    ids = tokenizer("\n\n".join(pydoc_eval_text()))["input_ids"]
    ids = torch.tensor(ids[: 16 * 128]).view(16, 128)  # [B, T]
    return agreement(model, ids, ["bf16", *int8_kernels(), "served@1", "served@16"])


def agreement_on_bench_model(hf_dir: Path) -> dict:
    """`agreement` on the random-weight benchmark model over held-out stdlib prose."""
    import email
    import http
    import inspect

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    text = "\n\n".join(filter(None, (inspect.getdoc(o) for m in (email, http) for _, o in inspect.getmembers(m))))
    ids = torch.tensor(tokenizer(text)["input_ids"][: 4 * 256]).view(4, 256)  # [B, T]
    return agreement(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), ids,
                     ["bf16", *int8_kernels(), "served@1", "served@16"])


def print_agreement(title: str, result: dict) -> None:
    base = result["fp32"]
    print(f"{title} ({base['positions']} positions, mean |logit| {base['logit']:.2f}, float32 perplexity "
          f"{base['ppl']:.3f}, {base['decided'] * 100:.1f} % of positions with a top-2 margin >= 0.1):")
    for variant, r in result.items():
        if variant != "fp32":
            print(f"  {variant:9s} top-1 agreement {r['top1'] * 100:6.2f} % (margin >= 0.1: "
                  f"{r['top1_decided'] * 100:6.2f} %), perplexity {r['ppl']:.3f} ({(r['ppl'] / base['ppl'] - 1) * 100:+.2f} %), max |dlogit| "
                  f"{r['max']:.3f}", flush=True)


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
    return {"ttfts": [r["ttft"] for r in results],
            "per_client": statistics.median(r["tokens"] / r["total"] for r in results),
            "aggregate": sum(r["tokens"] for r in results) / wall}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(len(ordered) * q / 100) - 1))]


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


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="20m,60m")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"server variants, from {list(VARIANTS)}")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--clients", default="1,2,8,16")
    p.add_argument("--repeats", type=int, default=3, help="rounds per client count (medians are reported)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no-quality", action="store_true", help="skip the trained tiny model's quality table")
    p.add_argument("--threads-check", action="store_true", help="time the decode step's thread settings, then exit")
    p.add_argument("--compile-check", action="store_true", help="time the decode step eager vs --compile, then exit")
    p.add_argument("--layout-check", action="store_true", help="time the linear weight layouts, then exit")
    args = p.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    variants = args.variants.split(",")
    from serve import cpu

    print(f"cpu: {cpu.describe()}; server --dtype auto = {cpu.default_dtype()}; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())} at start (other jobs on the box inflate every figure); "
          f"tokens/request {args.tokens}; medians of {args.repeats} rounds", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve.")
    goals, loads = [], [os.getloadavg()[0]]
    try:
        if not args.no_quality and not (args.threads_check or args.layout_check):
            print_agreement("quality vs float32: tiny Doge trained on stdlib prose, teacher-forced over the pydoc "
                            "eval text", quality := quality_on_trained_model())
            base = quality["fp32"]
            # per kernel, every layer int8; "served@N" (printed above) is the server's measured mix, which on this
            # tiny model's overhead-bound shapes may be float32 throughout: not a measure of int8
            for kernel in int8_kernels():
                top1, ppl = quality[kernel]["top1"], quality[kernel]["ppl"] / base["ppl"] - 1
                goals.append((f"int8 {kernel} top-1 agreement >= 99 %", f"{top1 * 100:.2f} %", top1 >= 0.99))
                goals.append((f"int8 {kernel} perplexity within 1 %", f"{ppl * 100:+.2f} %", abs(ppl) <= 0.01))
        for shape in args.shapes.split(","):
            hf_dir, jax_model, n_params = build(shape, Path(tmp.name))
            if args.threads_check:
                from serve_checks import threads_check

                threads_check(hf_dir, ["fp32", "bf16", "int8"], [1, 8])
                continue
            if args.compile_check:
                from serve_checks import compile_check

                for variant in ("bf16", "int8"):
                    compile_check(hf_dir, 128, variant)
                continue
            if args.layout_check:
                from serve_checks import layout_check

                layout_check(hf_dir, args.threads)
                continue
            base = Baselines(hf_dir, jax_model, args.tokens)
            harsh = agreement_on_bench_model(hf_dir)
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
                    loads.append(os.getloadavg()[0])
                rss = {v: s.peak_rss_mib() for v, s in servers.items()}
                kernels = {v: re.findall(r"int8 kernels by rows, measured in .*", s.log_path.read_text())
                           for v, s in servers.items()}
            finally:
                for server in servers.values():
                    server.stop()
            ref = {k: statistics.median(r[k]["tok_s"] for r in raw) for k in raw[0]}
            gen, smp = ref["generate fp32"], ref["sampler"]
            print(f"\n== Doge-{shape.upper()} shape: {n_params / 1e6:.1f}M params, vocab 32768, prompt "
                  f"{base.ids.shape[1]} tokens (sampler and generate give the same tokens: {base.same_tokens}); "
                  f"load {min(loads):.1f}-{max(loads):.1f} during the rounds")
            for k in raw[0]:
                threads = f", {raw[0][k]['threads']} thread(s)" if "threads" in raw[0][k] else ""
                print(f"{k}{threads}: {ref[k]:.1f} tok/s, first token "
                      f"{statistics.median(r[k]['ttft'] for r in raw) * 1e3:.0f} ms")
            print_agreement("random-weight model vs float32 over held-out stdlib prose (harsh: near-flat logits)",
                            harsh)
            del base
            print(f"{'server':>13} {'clients':>7} {'TTFT p50':>9} {'p99':>7} {'tok/s/client':>12} {'aggregate':>10} "
                  f"{'x gen fp32':>10} {'x gen bf16':>10} {'x sampler':>9} {'x 1 client':>10} {'x fp32':>7}",
                  flush=True)
            table = {}
            for variant in variants:
                for c in counts:
                    ttfts = [t for r in rounds[variant, c] for t in r["ttfts"]]
                    m = {k: statistics.median(r[k] for r in rounds[variant, c]) for k in ("per_client", "aggregate")}
                    m["p50"], m["p99"] = percentile(ttfts, 50), percentile(ttfts, 99)
                    table[variant, c] = m
                    one = table[variant, counts[0]]["aggregate"]
                    fp32 = table.get(("fp32", c))
                    print(f"{variant:>13} {c:>7} {m['p50'] * 1e3:>7.0f}ms {m['p99'] * 1e3:>5.0f}ms "
                          f"{m['per_client']:>12.1f} {m['aggregate']:>10.1f} {m['aggregate'] / gen:>9.2f}x "
                          f"{m['aggregate'] / ref['generate bf16']:>9.2f}x {m['aggregate'] / smp:>8.2f}x "
                          f"{m['aggregate'] / one:>9.2f}x "
                          f"{(m['aggregate'] / fp32['aggregate']) if fp32 else float('nan'):>6.2f}x")
                server = servers[variant]
                print(f"{variant:>13}: ready {server.ready_s:.1f} s after launch (warm-up {server.warmup_s:.2f} s), "
                      f"peak RSS {rss[variant]:.0f} MiB" + "".join(f"; {k}" for k in kernels[variant]), flush=True)
            default = {"bfloat16": "bf16", "float32": "fp32"}[cpu.default_dtype()]  # the server's --dtype auto

            def ratio(name: str, value: float, target: float) -> None:
                goals.append((f"Doge-{shape.upper()} {name}", f"{value:.2f}x", value >= target))

            one = table.get((default, 1))
            if shape == "20m" and one:
                ratio(f"1 client >= 3x generate fp32 ({default})", one["aggregate"] / gen, 3.0)
                ratio(f"1 client >= 1.0x doge-jax sampler ({default})", one["aggregate"] / smp, 1.0)
                for v in (v for v in variants if "compiled" in v and (v, 1) in table):  # opt-in: --compile
                    ratio(f"1 client >= 3x generate fp32 ({v})", table[v, 1]["aggregate"] / gen, 3.0)
                    ratio(f"1 client >= 1.0x doge-jax sampler ({v})", table[v, 1]["aggregate"] / smp, 1.0)
                if (default, 8) in table:
                    ratio(f"8 clients >= 4x 1 client ({default})",
                          table[default, 8]["aggregate"] / one["aggregate"], 4.0)
                for c in (1, 8, 16):
                    if ("int8", c) in table and ("fp32", c) in table:
                        target = 1.6 if c == 1 else 1.0
                        ratio(f"int8 >= {target}x fp32 at {c} client(s)",
                              table["int8", c]["aggregate"] / table["fp32", c]["aggregate"], target)
            if shape == "60m" and one:
                ratio(f"1 client >= 2.5x generate fp32 ({default})", one["aggregate"] / gen, 2.5)
        if goals:
            print(f"\nGoals (issue 24; load {min(loads):.1f}-{max(loads):.1f} over the run):")
            for name, shown, met in goals:
                print(f"  {name:58s} {shown:>9}  {'met' if met else 'NOT met'}")
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    main()
