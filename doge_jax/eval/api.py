"""Running lm-eval tasks on a doge-jax model: `evaluate` (full lm-eval results) and `run_tasks` (flat metrics,
what training-time evaluation logs).

The shipped task groups (`doge_base`, `doge_instruct`, tasks/) are always on the task path; `include_path` adds
the caller's own task YAMLs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax

from doge_jax.eval import results as results_lib

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def task_manager(include_path: str | Sequence[str] | None = None, tasks: Sequence[str] | None = None):
    """lm-eval's TaskManager over its own tasks, ours and `include_path`. Indexing every task YAML lm-eval ships
    takes ~15 s on our CPU, so one manager per set of paths is kept (training evaluates many times), and when
    `tasks` (names) resolve, group members included, among ours and `include_path` alone (the offline tasks, a
    user's own YAMLs), a manager over those paths only is returned: it indexes in milliseconds."""
    extra = (include_path,) if isinstance(include_path, str) else tuple(include_path or ())
    paths = (TASKS_DIR, *(os.path.abspath(p) for p in extra))
    if tasks is not None:
        names = _names(tasks)
        own = _task_manager(paths, include_defaults=False)
        if names and all(_resolves(name, own) for name in names):
            return own
    return _task_manager(paths)


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], include_defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def _resolves(name, manager, depth: int = 0) -> bool:
    """Whether task or group `name` (a group's member: a name, or a dict naming it under "task") and, for a
    group, each of its members is in `manager`'s index. An index entry of a shape this code does not know
    counts as unresolved (the caller then indexes every lm-eval task)."""
    if isinstance(name, dict):
        name = name.get("task")
    if not isinstance(name, str) or name not in manager.all_tasks or depth > 8:
        return False
    entry = manager.task_index[name]
    kind, cfg = getattr(getattr(entry, "kind", None), "name", None), getattr(entry, "cfg", None)
    if kind in ("TASK", "PY_TASK"):
        return True
    if kind != "GROUP" or not isinstance(cfg, dict):
        return False  # a tag (its members are found by scanning every index) or an unknown entry
    members = cfg.get("task")
    members = members if isinstance(members, list) else [members]
    return all(_resolves(m, manager, depth + 1) for m in members)


def _names(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a comma-separated string or a sequence."""
    return [t for t in tasks.split(",") if t] if isinstance(tasks, str) else list(tasks)


def check_tasks(tasks: Sequence[str], manager) -> list[str]:
    """Task names as a list, or one line naming the unknown ones (lm-eval itself only warns and skips them)."""
    tasks = _names(tasks)
    if not tasks:
        raise ValueError("tasks=[] must name at least one lm-eval task or group")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not os.path.isfile(t)]
    if unknown:
        raise ValueError(f"tasks={unknown} are not lm-eval tasks or groups (see `lm_eval ls tasks`; "
                         "your own YAMLs need include_path)")
    return tasks


def evaluate(lm, tasks: Sequence[str], *, limit: int | float | None = None, num_fewshot: int | None = None,
             include_path: str | Sequence[str] | None = None, apply_chat_template: bool = False,
             log_samples: bool = False, seed: int = 1234) -> dict:
    """lm-eval's `simple_evaluate` on `lm` (a DogeJaxLM or any lm-eval LM); returns its results dict."""
    import lm_eval

    manager = task_manager(include_path, tasks)
    tasks = check_tasks(tasks, manager)
    if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
        raise ValueError(f"limit={limit!r} must be a positive number (documents per task) or None")
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                  task_manager=manager, apply_chat_template=apply_chat_template,
                                  log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    if out is None:  # lm-eval returns None on non-zero ranks of a multi-process run
        return {}
    return dict(out)


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None, *, batch_size: int = 16, mesh=None,
              max_batch_tokens: int = 8192, include_path: str | Sequence[str] | None = None,
              workdir: str | None = None, step: int | None = None) -> dict[str, float]:
    """Evaluates an in-memory model on lm-eval `tasks` (at most `limit` documents each) and returns flat metrics,
    e.g. {"eval/arc_easy/acc": 0.41, "eval/arc_easy/acc_norm": 0.44} (stderr left out).

    model: a doge_jax Doge (its parameters may already live on `mesh`); tokenizer: an HF tokenizer or a folder
    holding one; mesh: the training mesh (the batch is split over its data axes). With `workdir`, also writes
    WORKDIR/eval_results.json (what `convert to-hf` puts in the model card), recording `step`. Every process of a
    multi-host job must call it with the same arguments. lm-eval reseeds Python's, numpy's and torch's global
    RNGs (seed 1234) on each call; JAX keys are untouched."""
    from doge_jax.eval.lm import DogeJaxLM

    lm = DogeJaxLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                   mesh=mesh)
    out = evaluate(lm, tasks, limit=limit, include_path=include_path)
    if workdir is not None and jax.process_index() == 0:
        results_lib.write(out, workdir=workdir, limit=limit, step=step)
    return results_lib.flatten(out)
