"""What a run tells its user: a progress bar and a console line per logged step, WORKDIR/metrics.jsonl (one
JSON object per logged step), TensorBoard scalars in WORKDIR/tensorboard, and WORKDIR/loss.png at the end.

Only process 0 writes. On resume the log is cut back to the restored step (lines a killed run wrote after its
last checkpoint are dropped, as are TensorBoard events past it), so the files read as one uninterrupted run.

On a gs:// workdir (objects cannot be appended to) metrics.jsonl is rewritten whole at each logged step (one
small upload), and TensorBoard writes to a local folder whose event files are uploaded to WORKDIR/tensorboard
every `_TB_UPLOAD_SECONDS` and at the end.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tempfile
import time

from tqdm.auto import tqdm

from doge_jax import storage

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
_TB_UPLOAD_SECONDS = 60.0


def _kept_lines(path: str, last_step: int) -> list[bytes]:
    """The complete lines of `path` whose step is ≤ last_step (a kill can leave a half-written line)."""
    if not storage.path(path).exists():
        return []
    kept = []
    for line in io.BytesIO(storage.path(path).read_bytes()):
        if not line.endswith(b"\n"):
            break
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return kept


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keeps the complete lines of `path` whose step is ≤ last_step."""
    if storage.path(path).exists():
        storage.write_bytes_atomic(path, b"".join(_kept_lines(path, last_step)))


def read_jsonl(path: str) -> list[dict]:
    text = storage.path(path).read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def format_line(record: dict, total_steps: int) -> str:
    """One console line: `step 100/300 | loss 5.1234 | lr 3.00e-03 | grad 0.52 | 1,234 tok/s | MFU 1.2%`."""
    width = len(str(total_steps))
    parts = [f"step {record['step']:>{width}}/{total_steps}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "grad_norm" in record:
        parts.append(f"grad {record['grad_norm']:.3f}")
    if record.get("tokens_per_sec") is not None:
        parts.append(f"{record['tokens_per_sec']:,.0f} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "eval_loss" in record:
        parts.append(f"eval {record['eval_loss']:.4f} (ppl {record['eval_ppl']:.1f})")
    return " | ".join(parts)


class RunLog:

    def __init__(self, workdir: str, *, start_step: int, total_steps: int, enabled: bool, progress_bar: bool,
                 tensorboard: bool):
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = storage.join(workdir, METRICS_FILE)
        self.remote = storage.is_remote(workdir)
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self._lines = _kept_lines(self.path, start_step)  # the whole file, when it is rewritten at each write
        if storage.path(self.path).exists():
            storage.write_bytes_atomic(self.path, b"".join(self._lines))
        if tensorboard:
            from tensorboardX import SummaryWriter

            tb_dir = storage.join(workdir, "tensorboard")
            self._tb_remote, self._tb_uploaded = (tb_dir, time.monotonic()) if self.remote else (None, 0.0)
            local_dir = tempfile.mkdtemp(prefix=".doge-tb-") if self.remote else tb_dir
            self.tb = SummaryWriter(local_dir, purge_step=start_step + 1 if start_step > 0 else None, flush_secs=30)
        # disable=None: a bar on a terminal, none in a log file (the per-step lines still print).
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=None if progress_bar else True)

    def advance(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: v for k, v in record.items() if v is not None}
        line = json.dumps(record) + "\n"
        if self.remote:
            self._lines.append(line.encode())
            storage.write_bytes_atomic(self.path, b"".join(self._lines))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    tag = (key if key.startswith("eval/") else  # lm-eval task scores: eval/<task>/<metric>
                           key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}")
                    self.tb.add_scalar(tag, value, record["step"])
            if self._tb_remote and time.monotonic() - self._tb_uploaded > _TB_UPLOAD_SECONDS:
                self._upload_tensorboard()
        self.info(format_line(record, self.total_steps))

    def _upload_tensorboard(self) -> None:
        self.tb.flush()
        storage.upload_dir(self.tb.logdir, self._tb_remote)
        self._tb_uploaded = time.monotonic()

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
            if self._tb_remote:
                storage.upload_dir(self.tb.logdir, self._tb_remote)
                shutil.rmtree(self.tb.logdir, ignore_errors=True)


def plot_loss(workdir: str) -> str | None:
    """WORKDIR/loss.png: train loss (and eval loss) against step, from metrics.jsonl."""
    path = storage.join(workdir, METRICS_FILE)
    if not storage.path(path).exists():
        return None
    records = read_jsonl(path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = {}  # lm-eval task metrics in [0, 1] (accuracies), by name: [(step, value)]
    for r in records:
        for key, value in r.items():
            if key.startswith("eval/") and isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
                scores.setdefault(key[len("eval/"):], []).append((r["step"], value))
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(12 if scores else 7, 4), dpi=120, squeeze=False)
    ax = axes[0, 0]
    if scores:
        for name, points in sorted(scores.items()):
            axes[0, 1].plot(*zip(*points), "o-", label=name, ms=3)
        axes[0, 1].set_xlabel("step")
        axes[0, 1].set_title("eval tasks (lm-eval)")
        axes[0, 1].grid(alpha=0.3)
        axes[0, 1].legend(fontsize=7)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(storage.path(workdir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = storage.join(workdir, PLOT_FILE)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    storage.write_bytes_atomic(out, png.getvalue())
    plt.close(fig)
    return out
