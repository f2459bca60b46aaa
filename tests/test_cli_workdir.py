"""`python -m doge_jax.train --config=configs/<preset>.py` with no --workdir: runs/<preset> under the current
directory, said in the first line, resumed by rerunning; the one-line note for a step too slow for this CPU."""

import os
import subprocess
import sys

import train_harness as th
from doge_jax.cli.train import SLOW_STEP_SECONDS, default_workdir, slow_cpu_warning


def test_default_workdir_then_resume(tmp_path):
    args = th.cli_args(th.write_corpus(str(tmp_path / "c.txt")), "unused", total_steps=2,
                       checkpoint__every_steps=0, peak_tflops=1e-9)  # 1 kFLOP/s: every step "takes hours"
    args = [a for a in args if not a.startswith("--workdir")]
    args[2] = f"--config={th.REPO}/configs/doge_tiny.py"
    env = {**os.environ, "PYTHONPATH": th.REPO}
    first = subprocess.run([sys.executable] + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("workdir: runs/doge_tiny (the default for this config")
    note = [line for line in lines if line.startswith("note: no accelerator here; one step of")]
    assert len(note) == 1 and "configs/doge_tiny.py trains in minutes here. Proceeding." in note[0]
    assert os.path.isdir(tmp_path / "runs" / "doge_tiny" / "checkpoints" / "2")
    again = subprocess.run([sys.executable] + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming {tmp_path}/runs/doge_tiny/checkpoints/2" in again.stdout


def test_slow_step_note_for_the_60m_preset_on_a_cpu():
    from configs import doge_60m, doge_tiny

    rate = 60e9  # a 2-core AMD EPYC's measured fp32 GEMM rate, about
    note = slow_cpu_warning(doge_60m.get_config(), "configs/doge_60m.py", rate)
    assert note.startswith("note: no accelerator here; one step of configs/doge_60m.py (512 x 2048 tokens")
    assert "takes at least 2.6 h on this CPU" in note and "\n" not in note
    assert slow_cpu_warning(doge_tiny.get_config(), "configs/doge_tiny.py", rate) is None
    assert SLOW_STEP_SECONDS == 180.0
    assert default_workdir("configs/doge_60m.py") == os.path.join("runs", "doge_60m")
    assert default_workdir("/abs/path/configs/tiny_sft.py:override") == os.path.join("runs", "tiny_sft")
