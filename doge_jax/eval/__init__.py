"""Evaluation with lm-evaluation-harness: the doge-jax model as an lm-eval `LM`, task groups for the seed's
tables, results as markdown + JSON and in the model card.

    python -m doge_jax.eval --checkpoint CKPT --tasks doge_base [--limit N] [--output DIR]
    lm_eval --model doge_jax --model_args checkpoint=CKPT --tasks arc_easy       (after `pip install`)

    from doge_jax.eval import run_tasks
    metrics = run_tasks(model, tokenizer, ["arc_easy"], limit=100)      # {"eval/arc_easy/acc": ..., ...}

`register()` adds `doge_jax` to lm-eval's model registry (importing `doge_jax.eval.lm` does too, and the
`doge_jax_lm_eval.pth` hook that `pip install` ships does it for the `lm_eval` CLI: see plugin.py). lm-eval is
imported on first use, so `doge_jax.eval.results` (what the converter reads) needs none.
"""

from doge_jax.eval.api import TASKS_DIR, evaluate, run_tasks

__all__ = ["DogeJaxLM", "TASKS_DIR", "evaluate", "run_tasks", "register"]


def register() -> None:
    from doge_jax.eval import plugin

    plugin.register()


def __getattr__(name):
    if name == "DogeJaxLM":
        from doge_jax.eval.lm import DogeJaxLM

        return DogeJaxLM
    raise AttributeError(f"module 'doge_jax.eval' has no attribute {name!r}")
