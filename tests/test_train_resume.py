"""Exact resume: `kill -9` mid-run, then SIGTERM mid-resume, then resume again — the losses are bitwise those
of an uninterrupted run (CPU), and metrics.jsonl reads as one run."""

import os
import signal
import subprocess
import sys
import time

import pytest

import train_harness as th
from doge_jax import checkpoint as ckpt

TOTAL = 30


def _env(tmp_path):
    # One compiled train step shared by the four runs (a persistent cache hit is the same executable).
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _start(args, env, log):
    return subprocess.Popen([sys.executable] + args, cwd=th.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(proc, workdir, after_step: int, timeout=240) -> tuple[int, int]:
    """Waits until a checkpoint > after_step is complete and a later step is logged: (checkpoint, logged step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        try:
            saved = ckpt.resolve(workdir).step
            logged = th.losses(workdir)[-1][0]
        except (FileNotFoundError, ValueError, IndexError):
            saved = logged = -1
        if saved > after_step and logged > saved:
            return saved, logged
        time.sleep(0.02)
    raise TimeoutError(workdir)


def test_kill9_and_sigterm_resume_exactly(tmp_path):
    corpus = th.write_corpus(str(tmp_path / "c.txt"))
    env = _env(tmp_path)
    common = dict(total_steps=TOTAL, checkpoint__every_steps=4, eval_every=10, eval_batches=2, tensorboard=True)
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")

    ref = subprocess.run([sys.executable] + th.cli_args(corpus, whole, **common), cwd=th.REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    with open(tmp_path / "log1", "w") as log:
        proc = _start(th.cli_args(corpus, parts, **common), env, log)
        saved1, _ = _wait_for(proc, parts, after_step=0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open(tmp_path / "log2", "w") as log:
        proc = _start(th.cli_args(corpus, parts, **common), env, log)
        saved2, _ = _wait_for(proc, parts, after_step=saved1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    stopped_at = ckpt.resolve(parts).step
    assert saved1 < stopped_at < TOTAL
    last = subprocess.run([sys.executable] + th.cli_args(corpus, parts, **common), cwd=th.REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stdout + last.stderr
    assert f"resuming {parts}/checkpoints/{stopped_at}" in last.stdout

    a, b = th.read_records(whole), th.read_records(parts)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, TOTAL + 1))
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "lr", "eval_loss"):
            assert x.get(key) == y.get(key), (x["step"], key, x.get(key), y.get(key))
    assert os.path.exists(os.path.join(parts, "loss.png"))
    assert os.listdir(os.path.join(parts, "tensorboard"))
    assert ckpt.resolve(parts).step == TOTAL


def _wait_for_logged(proc, workdir, after_step: int, timeout=240) -> int:
    """Waits until a step after `after_step` is logged; returns it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        try:
            logged = th.losses(workdir)[-1][0]
        except (FileNotFoundError, ValueError, IndexError):
            logged = -1
        if logged > after_step:
            return logged
        time.sleep(0.02)
    raise TimeoutError(workdir)


def test_ctrl_c_saves_and_stops_and_a_second_ctrl_c_stops_at_once(tmp_path):
    """SIGINT (Ctrl-C) stops a run after the step in progress, with a checkpoint, exit 130 and no traceback; a
    second one during the next run stops it at once, in one line naming the last checkpoint, which stays whole
    and resumable. Steps of a few tenths of a second here, so the second signal lands inside one."""
    corpus = th.write_corpus(str(tmp_path / "c.txt"))
    run = str(tmp_path / "run")
    slow = dict(total_steps=400, checkpoint__every_steps=0, eval_every=0, batch_size=32, seq_len=64,
                model__hidden_size=256, model__intermediate_size=1024)
    args = th.cli_args(corpus, run, **slow)
    log1 = tmp_path / "log1"
    with open(log1, "w") as log:
        proc = _start(args, os.environ, log)
        _wait_for_logged(proc, run, after_step=0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log1.read_text()[-3000:]
    out = log1.read_text()
    assert "Traceback" not in out and "stopped (signal) at step" in out, out[-3000:]
    stopped_at = ckpt.resolve(run).step
    assert f"stopped (signal) at step {stopped_at}:" in out and stopped_at == th.losses(run)[-1][0]

    log2 = tmp_path / "log2"
    with open(log2, "w") as log:
        proc = _start(args, os.environ, log)
        _wait_for_logged(proc, run, after_step=stopped_at)
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + 60
        while "SIGINT: saving a checkpoint after this step" not in log2.read_text():  # the first one was handled
            assert time.time() < deadline and proc.poll() is None, log2.read_text()[-3000:]
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log2.read_text()[-3000:]
    out = log2.read_text()
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("stopped: ")]
    assert len(lines) == 1 and "stopped at once by a second SIGINT: the steps after step" in lines[0], out[-3000:]
    final = ckpt.resolve(run).step  # the latest complete checkpoint: the one the line names
    assert final >= stopped_at and f"{run}/checkpoints/{final}, is intact" in lines[0], (lines, final)


def test_a_second_ctrl_c_exits_without_waiting_for_the_step_in_flight(tmp_path):
    """"Stopped at once" means the process ends then: the step the device is running cannot be cancelled, and a
    normal interpreter exit would wait for it (doge_60m on a 2-core CPU: 42 minutes). Here a first step of ~10-30 s;
    both signals land right after the run's banner, inside it, and the process must be gone within a few seconds
    of the "stopped:" line, with no checkpoint claimed and no traceback."""
    corpus = th.write_corpus(str(tmp_path / "c.txt"))
    run = str(tmp_path / "run")
    heavy = dict(total_steps=3, checkpoint__every_steps=0, eval_every=0, batch_size=128, seq_len=256,
                 model__hidden_size=512, model__intermediate_size=2048, model__max_position_embeddings=256,
                 model__keep_window_size=256)
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        proc = _start(th.cli_args(corpus, run, **heavy), os.environ, log)

        def wait_for(text: str, timeout: float) -> float:
            deadline = time.time() + timeout
            while text not in log_path.read_text():
                assert time.time() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.01)
            return time.time()

        wait_for("params (", 300)  # the banner: compiled, the training loop starts now
        proc.send_signal(signal.SIGINT)
        wait_for("SIGINT: saving a checkpoint after this step", 60)
        proc.send_signal(signal.SIGINT)
        stopped = wait_for("stopped: ", 60)
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"still running 5 s after the stop line, waiting for its step: "
                                 f"{log_path.read_text()[-2000:]}") from None
    out = log_path.read_text()
    assert code == 130 and "Traceback" not in out, out[-3000:]
    assert "no checkpoint was written yet" in out and time.time() - stopped < 6
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        ckpt.resolve(run)
