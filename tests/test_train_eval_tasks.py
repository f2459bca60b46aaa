"""config.eval_tasks: lm-eval tasks scored during training on the training mesh, logged to metrics.jsonl,
TensorBoard and loss.png, kept in eval_results.json for the exported model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *extra):
    cmd = [sys.executable, "-m", "doge_jax.train", "--config=configs/doge_tiny.py", f"--workdir={workdir}",
           "--config.total_steps=4", "--config.eval_every=2", "--config.eval_batches=1",
           "--config.schedule.warmup_steps=1", "--config.checkpoint.every_steps=0", "--config.progress_bar=False",
           *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_eval_tasks_are_scored_logged_and_reach_the_card(tmp_path):
    work = tmp_path / "run"
    proc = _train(work, "--config.eval_tasks=pydoc_cloze", "--config.eval_tasks_limit=8")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval/pydoc_cloze/acc" in r]
    assert [r["step"] for r in scored] == [2, 4]
    assert all(0.0 <= r["eval/pydoc_cloze/acc"] <= 1.0 and "eval_loss" in r for r in scored)
    saved = json.loads((work / "eval_results.json").read_text())
    assert saved["step"] == 4 and saved["limit"] == 8
    assert (work / "loss.png").stat().st_size > 0
    assert any("eval" in name for name in os.listdir(work / "tensorboard")) or os.listdir(work / "tensorboard")

    out = tmp_path / "hf"
    conv = subprocess.run([sys.executable, "-m", "convert", "to-hf", "--checkpoint", str(work), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert conv.returncode == 0, conv.stderr[-2000:]
    card = (out / "README.md").read_text()
    assert "model-index" in card and "pydoc_cloze" in card


def test_eval_tasks_need_an_eval_interval(tmp_path):
    proc = _train(tmp_path / "x", "--config.eval_tasks=pydoc_cloze", "--config.eval_every=0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config.eval_tasks='pydoc_cloze' needs config.eval_every > 0 (when to score them)")
    assert not (tmp_path / "x").exists()
