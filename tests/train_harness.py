"""Tiny training runs for the trainer tests: configs, a small offline corpus, and a subprocess entry point.

`python tests/train_harness.py meshes OUT_JSON` (with XLA_FLAGS=--xla_force_host_platform_device_count=8 set
by the caller) trains the same tiny run on one device and on several 8-device meshes, resumes a run onto a
different mesh, and writes every run's per-step losses to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # the subprocess entry point runs as a script

# 2 layers, hidden 64, seq 32: compiles in seconds; T = 32 < keep_window_size, like any short-context run.
TINY = {
    "model.num_hidden_layers": 2,
    "model.hidden_size": 64,
    "model.intermediate_size": 128,
    "model.num_attention_heads": 4,
    "model.num_key_value_heads": 2,
    "model.max_position_embeddings": 64,
    "model.keep_window_size": 64,
    "seq_len": 32,
    "batch_size": 8,
    "total_steps": 6,
    "schedule.warmup_steps": 1,
    "schedule.decay_steps": 0,
    "log_every": 1,
    "eval_every": 0,
    "checkpoint.every_steps": 2,
    "progress_bar": False,
    "tensorboard": False,
    "peak_tflops": 1.0,  # skips the CPU GEMM measurement
    "data.source": "text",
    "data.text_unit": "paragraph",
    "data.eval_fraction": 0.05,
}

_WORDS = ("the a model data token train step loss mesh device shard batch value key query grad norm scale "
          "python function class module return list dict string number file path error time").split()


def write_corpus(path: str, paragraphs: int = 300, seed: int = 0) -> str:
    """A small English-like text file, paragraphs separated by blank lines (deterministic)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(paragraphs):
            words = rng.choice(_WORDS, size=int(rng.integers(20, 60)))
            f.write(" ".join(words).capitalize() + ".\n\n")
    return path


def tiny_config(corpus: str, **overrides):
    """configs/doge_tiny.py with TINY and `overrides` (dotted keys written with '__', e.g. mesh__data=2)."""
    from configs import doge_tiny

    config = doge_tiny.get_config()
    for key, value in {**TINY, "data.path": corpus, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def cli_args(corpus: str, workdir: str, **overrides) -> list[str]:
    """`python -m doge_jax.train` arguments for the same tiny run."""
    items = {**TINY, "data.path": corpus, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return ["-m", "doge_jax.train", "--config=configs/doge_tiny.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in items.items()]


def read_records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_records(workdir) if "loss" in r]


MESHES = [
    {"data": 8},
    {"fsdp": 8},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 4, "expert": 2},
]


def _mesh_cfg(sizes: dict):
    import ml_collections

    return ml_collections.ConfigDict({a: sizes.get(a, 1) for a in ("data", "fsdp", "tensor", "expert")})


def meshes(out_json: str) -> None:
    import tempfile

    import jax

    from doge_jax.trainer import Trainer, make_mesh

    assert jax.device_count() == 8, jax.devices()
    root = tempfile.mkdtemp()
    corpus = write_corpus(os.path.join(root, "corpus.txt"))
    results = {}

    def train(name, sizes, devices=None, workdir=None, **overrides):
        config = tiny_config(corpus, **{"total_steps": 4, **overrides})
        config.mesh = _mesh_cfg(sizes)
        workdir = workdir or os.path.join(root, name)
        Trainer(config, workdir, mesh=make_mesh(config.mesh, devices)).run()
        results[name] = losses(workdir)

    train("1 device", {}, devices=jax.devices()[:1])
    for sizes in MESHES:
        train(" ".join(f"{a}={s}" for a, s in sizes.items()), sizes)
    # Checkpoint at step 2 on fsdp=8, continue to step 4 on data=2 fsdp=2 tensor=2 (restore onto another mesh).
    moved = os.path.join(root, "moved")
    train("moved-first", {"fsdp": 8}, workdir=moved, total_steps=2)
    train("moved", {"data": 2, "fsdp": 2, "tensor": 2}, workdir=moved)
    with open(out_json, "w") as f:
        json.dump(results, f)


def moe(out_json: str) -> None:
    """A tiny MoE through the Trainer on 1 device and on data=2 × expert=4 (expert-parallel CDMoE)."""
    import tempfile

    import jax

    from doge_jax.trainer import Trainer, make_mesh

    root = tempfile.mkdtemp()
    corpus = write_corpus(os.path.join(root, "corpus.txt"))
    results = {}
    for name, sizes, devices in (("1 device", {}, jax.devices()[:1]), ("data=2 expert=4", {"data": 2, "expert": 4},
                                                                      None)):
        config = tiny_config(corpus, total_steps=3, model__is_moe=True, model__num_experts=64,
                             model__num_experts_per_tok=4, model__router_z_loss_coef=1e-3)
        config.mesh = _mesh_cfg(sizes)
        workdir = os.path.join(root, name.replace(" ", "_"))
        Trainer(config, workdir, mesh=make_mesh(config.mesh, devices)).run()
        results[name] = [r for r in read_records(workdir) if "loss" in r]
    with open(out_json, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    {"meshes": meshes, "moe": moe}[sys.argv[1]](*sys.argv[2:])
