"""grad_accum_steps="auto" (doge_jax/trainer/fit.py) through the real trainer and entry point, on CPU.

- "auto" picks the fewest micro-batches whose compiled step fits a memory limit the test imposes
  (config.memory_limit_gb), set between the peaks the compiler reports for the candidates;
- it refuses with one line and exit 2, before writing anything, when even one sequence per device cannot fit;
- a step that really runs out of memory (the process's address space capped with RLIMIT_AS, so XLA's allocation
  of the step's temporaries fails) ends with one line naming the peak, the limit and --config.grad_accum_steps=N,
  and leaves the last checkpoint as it was: resuming from it with N trains on;
- the split does not change the run: two steps with 4 micro-batches, or one and then (resumed) one with 1,
  give the same losses (float32 rtol 1e-5: sums in another order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train_harness as th
from doge_jax.trainer import fit

ENV = {**os.environ, "PYTHONPATH": th.REPO, "JAX_PLATFORMS": "cpu"}


def _cli(args, **kw):
    return subprocess.run([sys.executable] + args, cwd=th.REPO, env=ENV, capture_output=True, text=True,
                          timeout=900, **kw)


def _fit_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("micro-batches: ")]
    assert len(lines) == 1, stdout
    return lines[0]


class _Compiled:
    """What fit.choose reads of a compiled step: memory_analysis() (a step whose peak is linear in its rows)."""

    def __init__(self, fixed, per_row, rows):
        self.fixed, self.temp = fixed, per_row * rows

    def memory_analysis(self):
        from types import SimpleNamespace

        return SimpleNamespace(argument_size_in_bytes=self.fixed, output_size_in_bytes=0, alias_size_in_bytes=0,
                               temp_size_in_bytes=self.temp)


def test_choose_compiles_few_steps_and_picks_the_fewest_that_fit():
    """The search: 1 compile when the whole batch fits, else the extremes, a prediction and its check."""
    compiled = []

    def compile_step(a):
        compiled.append(a)
        return _Compiled(fixed=1000, per_row=10, rows=512 // a)

    mem = fit.DeviceMemory(limit=2000, margin=0.0, source="test")
    choice = fit.choose(compile_step, batch_size=512, row_multiple=8, memory=mem, data_parallel=8)
    # 64 rows fit (1640 B), 128 do not (2280 B): predicted from A = 1 and 64, confirmed, and A = 4 checked.
    assert choice.num_micro == 8 and choice.peak == 1000 + 10 * 64 and compiled == [1, 64, 8, 4]
    # A peak that grows faster than linearly in the rows: the line through the extremes overestimates the middle
    # (A = 2: 7451 predicted, 4276 real), so the fewest that fit is found by compiling the smaller counts.
    order = []

    def convex(a):
        order.append(a)
        return _Compiled(fixed=1000 + int(0.05 * (512 // a) ** 2), per_row=0, rows=0)

    got = fit.choose(convex, batch_size=512, row_multiple=8, memory=fit.DeviceMemory(4500, 0.0, "t"),
                     data_parallel=8)
    assert got.num_micro == 2 and got.peak == 4276 and order == [1, 64, 4, 2], (got.num_micro, order)
    compiled.clear()
    assert fit.choose(compile_step, batch_size=512, row_multiple=8, memory=fit.DeviceMemory(10**6, 0.0, "t"),
                      data_parallel=8).num_micro == 1 and compiled == [1]
    with pytest.raises(fit.DoesNotFit, match=r"even 1 sequence per device \(64 micro-batches of 8\) needs"):
        fit.choose(compile_step, batch_size=512, row_multiple=8, memory=fit.DeviceMemory(1000, 0.0, "t"),
                   data_parallel=8)
    assert fit.candidates(12, 2) == [1, 2, 3, 6] and fit.candidates(12, 5) == []


def _measured_peaks(corpus, tmp_path, accums, **overrides):
    """The compiler's per-device peak of the tiny run's step for each micro-batch count (as the trainer sees it)."""
    from doge_jax.trainer import Trainer

    config = th.tiny_config(corpus, **overrides)
    trainer = Trainer(config, str(tmp_path / "probe"))
    trainer._setup()
    trainer._compile_steps()
    spec = {k: ((config.seq_len,), np.dtype(np.int32)) for k in ("input_ids", "targets", "segment_ids", "positions")}
    return {a: fit.step_peak(trainer._compile_at(a, spec)) for a in accums}


def test_auto_picks_the_fewest_micro_batches_under_an_imposed_limit(tmp_path):
    corpus = th.write_corpus(str(tmp_path / "c.txt"))
    common = dict(batch_size=16, seq_len=64, model__max_position_embeddings=64, total_steps=2,
                  checkpoint__every_steps=0)
    peaks = _measured_peaks(corpus, tmp_path, [1, 2, 4, 8, 16], **common)
    assert peaks[1] > peaks[2] > peaks[4] > peaks[8] > peaks[16], peaks  # more rows, more memory
    usable = (peaks[4] + peaks[2]) / 2  # 4 micro-batches fit, 2 do not
    limit_gb = usable / (1 - fit.MARGIN["cpu"]) / 1e9
    proc = _cli(th.cli_args(corpus, str(tmp_path / "run"), memory_limit_gb=limit_gb, **common))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = _fit_line(proc.stdout)
    assert line.startswith("micro-batches: 4 of 4 sequences per device (chosen to fit; peak "), line
    assert f"config.memory_limit_gb={limit_gb:g}" in line
    assert "16 x 64 (1,024 tokens/step, 4 micro-batches" in proc.stdout
    # The whole batch at once when it fits is the path of every other trainer test (the default is "auto").


def test_auto_refuses_in_one_line_before_writing_anything(tmp_path):
    corpus = th.write_corpus(str(tmp_path / "c.txt"))
    workdir = tmp_path / "run"
    proc = _cli(th.cli_args(corpus, str(workdir), memory_limit_gb=1e-4, batch_size=8))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err[-1].startswith("error: config.grad_accum_steps='auto': even 1 sequence per device (8 micro-batches "
                              "of 1) needs "), proc.stderr
    assert "config.memory_limit_gb=0.0001" in err[-1] and "config.model.remat_policy='attention'" in err[-1]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()  # nothing written: no checkpoint, tokenizer or log


# The process's address space capped at what it holds after importing the trainer plus HEADROOM: enough for
# the backend, the compile, Orbax's restore threads and the data pipeline, not for the step's temporaries.
HEADROOM = 3 * 10**9
CAPPED = r"""
import resource, runpy, sys
import doge_jax.cli.train, doge_jax.trainer, grain, orbax.checkpoint
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]),) * 2)
sys.argv = ["doge_jax.train"] + sys.argv[2:]
runpy.run_module("doge_jax.train", run_name="__main__")
"""


@pytest.mark.slow
def test_a_real_out_of_memory_ends_in_one_line_and_keeps_the_checkpoint(tmp_path):
    corpus = th.write_corpus(str(tmp_path / "c.txt"))
    workdir = str(tmp_path / "run")
    # 128 × 512 tokens with the whole batch's logits and the XLA attention's scores: ~8 GB of temporaries at
    # 1 micro-batch, ~0.3 GB at 32.
    common = dict(batch_size=128, seq_len=512, model__max_position_embeddings=512, model__keep_window_size=512,
                  loss_chunk_tokens=-1, checkpoint__every_steps=1)
    first = _cli(th.cli_args(corpus, workdir, grad_accum_steps=32, total_steps=1, **common))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    args = th.cli_args(corpus, workdir, grad_accum_steps=1, total_steps=2, **common)
    proc = _cli(["-c", CAPPED, str(HEADROOM)] + args[2:])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert err.startswith("error: out of device memory in step 2 with 1 micro-batches: the compiled step needs "), err
    peak = float(_fit_line(proc.stdout).split("peak ")[1].split(" ")[0])
    assert peak > HEADROOM / 1e9 and f"needs {fit.gb(int(peak * 1e9))[:3]}" in err
    n = int(err.split("--config.grad_accum_steps=")[1].split(" ")[0])
    assert n in (2, 4) and err.endswith(f"untouched: {workdir}/checkpoints/1)"), err
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
    resumed = _cli(th.cli_args(corpus, workdir, grad_accum_steps=n, total_steps=2, **common))
    assert resumed.returncode == 0 and f"resuming {workdir}/checkpoints/1" in resumed.stdout, resumed.stderr[-3000:]


def test_resuming_with_another_split_continues_the_same_run(tmp_path):
    """How "auto" stays exact when a resumed run lands on a machine that chooses another count."""
    corpus = th.write_corpus(str(tmp_path / "c.txt"))
    common = dict(batch_size=8, total_steps=2, checkpoint__every_steps=1)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert _cli(th.cli_args(corpus, straight, grad_accum_steps=4, **common)).returncode == 0
    assert _cli(th.cli_args(corpus, split, grad_accum_steps=4, **{**common, "total_steps": 1})).returncode == 0
    resumed = _cli(th.cli_args(corpus, split, grad_accum_steps=1, **common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = th.losses(straight), th.losses(split)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2]
    np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=1e-5)
    with open(os.path.join(split, "metrics.jsonl")) as f:
        grad_norms = [json.loads(line)["grad_norm"] for line in f if "grad_norm" in line]
    assert len(grad_norms) == 2
