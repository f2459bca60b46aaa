"""lm-eval throughput: the doge_jax LM vs lm-eval's own `hf` backend, same weights, same task, same CPU, one run.

    python benchmarks/bench_eval.py                           # Doge-20M shape, 64 docs x 4 choices, batch 16
    python benchmarks/bench_eval.py --config configs/doge_tiny.py --docs 128 --batch-size 32
    python benchmarks/bench_eval.py --server       # + lm-eval local-completions through `python -m serve`

Weights are random (the preset's shape, `A` drawn from N(0, 0.5) so the DMA mask varies); the task is a
multiple-choice YAML over a jsonl this script writes (contexts of 20-80 words, 4 endings of 3-12 words: ARC /
HellaSwag-like lengths), so nothing is downloaded. Each backend runs the task twice through
`lm_eval.simple_evaluate`; the first run includes compilation / warm-up, the second is timed. requests/s counts
lm-eval loglikelihood requests (docs x choices). Both in float32; the script also prints the largest per-choice
log-likelihood difference and whether the accuracies agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASK = "bench_eval_mc"
WORDS = ("the a model data token train step loss mesh device shard batch value key query grad norm scale python "
         "function class module return list dict string number file path error time when which each every "
         "reads writes keeps sends holds makes takes gives finds uses").split()


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def write_task(folder: str, docs: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sentence = lambda lo, hi: " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))  # noqa: E731
    with open(os.path.join(folder, "data.jsonl"), "w") as f:
        for _ in range(docs):
            doc = {"context": sentence(20, 80).capitalize(), "endings": [sentence(3, 12) for _ in range(4)],
                   "label": int(rng.integers(4))}
            f.write(json.dumps(doc) + "\n")
    with open(os.path.join(folder, f"{TASK}.yaml"), "w") as f:
        f.write(f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                f"{os.path.join(folder, 'data.jsonl')}\noutput_type: multiple_choice\ntest_split: test\n"
                "doc_to_text: '{{context}}'\ndoc_to_choice: '{{endings}}'\ndoc_to_target: '{{label}}'\n"
                "target_delimiter: ' '\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def start_server(model_dir: str, log_dir: str):
    """`python -m serve` on a free port (one torch thread, as the serve tests run it); (process, base URL)."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(log_dir, "serve.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", model_dir, "--port", str(port),
                             "--served-model-name", "bench", "--threads", "1", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start; see {log.name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/doge_20m.py")
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--server", action="store_true",
                   help="also time lm-eval's local-completions against `python -m serve` on the export")
    args = p.parse_args(argv)

    import jax
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    import convert
    from doge_jax import checkpoint as ckpt
    from doge_jax.model import decoder as model_lib
    from doge_jax.model.config import DogeConfig
    from doge_jax.data import load_tokenizer
    from doge_jax.eval import api
    from doge_jax.eval.lm import DogeJaxLM

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DogeConfig.from_dict(load_config(args.config).model.to_dict())
    params = ckpt.params_of(model_lib.build(cfg, seed=0))
    rng = np.random.default_rng(0)
    for layer in params["layers"].values():
        layer["self_attn"]["A"] = rng.normal(0.0, 0.5, layer["self_attn"]["A"].shape).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        ckpt.save_params(run, 0, params, cfg)
        # The shipped 8192-token tokenizer (no download): its ids fit any preset's vocabulary.
        load_tokenizer("default").save_pretrained(os.path.join(run, ckpt.TOKENIZER))
        hf_dir = convert.to_hf(run, os.path.join(tmp, "hf"))
        write_task(tmp, args.docs)
        manager = api.task_manager(tmp)
        backends = {
            "doge_jax": DogeJaxLM(checkpoint=run, batch_size=args.batch_size),
            "lm-eval hf": HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=args.batch_size),
        }
        if args.server:
            server = start_server(hf_dir, tmp)
            backends["local-completions"] = lm_eval.api.registry.get_model("local-completions")(
                model="bench", base_url=f"{server[1]}/v1/completions", tokenizer=hf_dir,
                tokenizer_backend="huggingface", tokenized_requests=True, batch_size=args.batch_size,
                max_length=cfg.max_position_embeddings)
        timings, outs = {}, {}
        try:
            for name, lm in backends.items():
                for attempt in range(2):  # the first run compiles (JAX) / warms up (torch)
                    t0 = time.perf_counter()
                    outs[name] = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager,
                                                         log_samples=True)
                    timings[name] = time.perf_counter() - t0
        finally:
            if args.server:
                server[0].terminate()
                server[0].wait(timeout=30)
    requests = 4 * args.docs
    ll = {n: np.array([[r[0][0] for r in s["resps"]] for s in sorted(o["samples"][TASK], key=lambda s: s["doc_id"])])
          for n, o in outs.items()}
    acc = {n: o["results"][TASK]["acc,none"] for n, o in outs.items()}
    print(f"config={args.config} params={model_lib.count_params(cfg) / 1e6:.1f}M docs={args.docs} requests={requests} "
          f"batch_size={args.batch_size} jax={jax.__version__} torch={torch.__version__} lm_eval={lm_eval.__version__} "
          f"torch_threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    for name, seconds in timings.items():
        print(f"  {name:12s} {requests / seconds:8.1f} requests/s   ({seconds:.2f} s, acc {acc[name]:.4f})")
    print(f"  speedup doge_jax / lm-eval hf {timings['lm-eval hf'] / timings['doge_jax']:.2f}x   "
          f"accuracies equal: {len(set(acc.values())) == 1}")
    for name in ll:
        if name != "lm-eval hf":
            print(f"  max |dLL| {name} vs lm-eval hf: {np.max(np.abs(ll[name] - ll['lm-eval hf'])):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
