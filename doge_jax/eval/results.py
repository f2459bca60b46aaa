"""lm-eval results → flat metrics, a markdown table beside the seed's published numbers, JSON files, and the
`model-index` block of a model card. Needs no lm-eval import (the converter reads these files too).

Files an evaluation writes:
    OUT/results.json          lm-eval's own output (configs, versions, every metric)
    OUT/results.md            the tables below
    WORKDIR/eval_results.json what `convert to-hf` puts in the model card (task, metric, value, shots, versions)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from importlib import metadata

EVAL_RESULTS = "eval_results.json"

# The seed's published base-model scores (%, SmallDoge model cards; lighteval, 5-shot).
PUBLISHED = {
    "Doge-20M": {"MMLU": 25.4, "ARC": 29.8, "PIQA": 58.4, "HellaSwag": 27.3, "Winogrande": 50.2},
    "Doge-60M": {"MMLU": 26.4, "ARC": 37.9, "PIQA": 61.4, "HellaSwag": 31.5, "Winogrande": 50.8},
    "Doge-160M": {"MMLU": 29.2, "ARC": 44.4, "PIQA": 70.1, "HellaSwag": 43.4, "Winogrande": 52.2},
    "Doge-320M": {"MMLU": 33.8, "ARC": 52.1, "PIQA": 73.9, "HellaSwag": 52.7, "Winogrande": 55.0},
}
# Each published column from lm-eval tasks: (tasks averaged, metric). The seed's "ARC" is read as the mean of
# ARC-Easy and ARC-Challenge (its `custom|arc` runs both). lighteval's length-normalised accuracy is lm-eval's
# acc_norm, except for MMLU: lm-eval's mmlu_continuation group aggregates `acc` only, so that column is
# unnormalised (a known difference). Winogrande scores one shared continuation: plain acc is the only metric.
SEED_COLUMNS = {
    "MMLU": (("mmlu_continuation",), "acc"),
    "ARC": (("arc_easy", "arc_challenge"), "acc_norm"),
    "PIQA": (("piqa",), "acc_norm"),
    "HellaSwag": (("hellaswag",), "acc_norm"),
    "Winogrande": (("winogrande",), "acc"),
}


def versions() -> dict[str, str]:
    out = {}
    for dist in ("doge-jax", "lm_eval"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results["results"] → {task: {metric: value}}; filter suffixes dropped when "none", else kept as
    `metric_filter`; stderr and non-numeric entries dropped."""
    out: dict[str, dict[str, float]] = {}
    for task, entries in results.get("results", {}).items():
        metrics = {}
        for key, value in entries.items():
            if key in ("alias", "sample_len", "sample_count") or "_stderr" in key or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            metrics[name if filt in ("", "none") else f"{name}_{filt}"] = float(value)
        if metrics:
            out[task] = metrics
    return out


def flatten(results: dict, prefix: str = "eval") -> dict[str, float]:
    """{"eval/arc_easy/acc": 0.41, ...}: what training logs to metrics.jsonl and TensorBoard."""
    return {f"{prefix}/{task}/{metric}": value for task, metrics in task_metrics(results).items()
            for metric, value in metrics.items()}


def seed_row(results: dict) -> dict[str, float | None]:
    """Our scores (%) in the seed's published columns; None where a column's tasks were not run."""
    metrics = task_metrics(results)
    row: dict[str, float | None] = {}
    for column, (tasks, metric) in SEED_COLUMNS.items():
        values = [metrics[t][metric] for t in tasks if metric in metrics.get(t, {})]
        row[column] = 100 * sum(values) / len(values) if len(values) == len(tasks) else None
    return row


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1f}" if percent else f"{value:.4f}"


def markdown(results: dict, name: str = "this model") -> str:
    """Every task's metrics, then the seed's columns with the published rows underneath."""
    metrics = task_metrics(results)
    shots = results.get("n-shot", {})
    lines = ["| task | shots | metric | value |", "|---|---|---|---|"]
    for task in sorted(metrics):
        for metric, value in sorted(metrics[task].items()):
            lines.append(f"| {task} | {shots.get(task, '')} | {metric} | {_fmt(value)} |")
    row = seed_row(results)
    if any(v is not None for v in row.values()):
        cols = list(SEED_COLUMNS)
        lines += ["", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                  f"| {name} | " + " | ".join(_fmt(row[c], True) for c in cols) + " |"]
        for model, published in PUBLISHED.items():
            lines.append(f"| {model} (published) | " + " | ".join(_fmt(published[c], True) for c in cols) + " |")
        lines += ["", "Columns as the seed reports them (%): " + "; ".join(
            f"{c} = {'/'.join(t)} {m}" for c, (t, m) in SEED_COLUMNS.items()) + "."]
    return "\n".join(lines) + "\n"


def _atomic_write(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def card_entries(results: dict, *, limit: int | None = None, step: int | None = None) -> dict:
    """What `eval_results.json` holds: one entry per (task, metric), plus versions and how the run was made."""
    shots = results.get("n-shot", {})
    entries = [{"task": task, "metric": metric, "value": value, "num_fewshot": shots.get(task)}
               for task, metrics in sorted(task_metrics(results).items()) for metric, value in sorted(metrics.items())]
    v = versions()
    return {"doge_jax_version": v["doge-jax"], "lm_eval_version": v["lm_eval"], "limit": limit, "step": step,
            "results": entries}


def write(results: dict, out_dir: str | None = None, *, workdir: str | None = None, name: str = "this model",
          limit: int | None = None, step: int | None = None) -> None:
    """results.json + results.md under out_dir; eval_results.json (for the model card) under workdir."""
    if out_dir:
        _atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2, default=str))
        _atomic_write(os.path.join(out_dir, "results.md"), markdown(results, name))
    if workdir:
        _atomic_write(os.path.join(workdir, EVAL_RESULTS),
                      json.dumps(card_entries(results, limit=limit, step=step), indent=2))


def read_card_entries(workdir: str) -> dict | None:
    """WORKDIR/eval_results.json, or None when the run wrote none; a broken file is an error naming it."""
    path = os.path.join(workdir, EVAL_RESULTS)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        for e in data["results"]:
            float(e["value"]), str(e["task"]), str(e["metric"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an eval_results.json written by doge_jax.eval ({type(e).__name__}: {e})")
    return data


def model_index(data: dict, name: str) -> list[dict]:
    """eval_results.json → the model card's `model-index` (Hugging Face's metadata for evaluation results)."""
    source = (f"lm-evaluation-harness {data['lm_eval_version']} through doge-jax {data['doge_jax_version']}"
              + (f", limit {data['limit']} per task" if data.get("limit") else ""))
    results = []
    for e in data["results"]:
        shots = f", {e['num_fewshot']}-shot" if e.get("num_fewshot") not in (None, "") else ""
        results.append({
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"name": e["task"], "type": e["task"]},
            "metrics": [{"type": e["metric"], "value": round(float(e["value"]), 6),
                         "name": f"{e['metric']}{shots}", "verified": False}],
            "source": {"name": source, "url": "https://github.com/EleutherAI/lm-evaluation-harness"},
        })
    return [{"name": name, "results": results}]
