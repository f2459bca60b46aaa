"""Model loading: a local dir, a Hub id (from a pre-filled Hub cache, never the network), and a clear failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from serve_fixtures import REPO, tiny_model_dir  # noqa: F401  (pytest fixture)


def _fake_hub_cache(cache, model_dir, repo_id: str) -> None:
    """Lay `model_dir` out the way huggingface_hub caches a download of `repo_id`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, root / "snapshots" / commit)


def _run(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO), **env_extra}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_hub_id_loads_through_from_pretrained(tiny_model_dir, tmp_path):
    _fake_hub_cache(tmp_path / "hub", tiny_model_dir, "doge-test/tiny-doge")
    code = (
        "from serve.loading import load\n"
        "from serve.config import ServeConfig\n"
        "model, tok = load('doge-test/tiny-doge', revision='main')\n"
        "print(model.config.model_type, type(model).__name__, bool(tok.chat_template),"
        " ServeConfig(model='doge-test/tiny-doge').model_name)\n"
        "import sys; assert 'jax' not in sys.modules and 'doge_jax' not in sys.modules\n"
    )
    out = _run(code, {"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["doge", "DogeForCausalLM", "True", "doge-test/tiny-doge"]


def test_serve_never_imports_jax(tiny_model_dir):
    code = (
        "import sys\n"
        "import serve.app, serve.engine, serve.__main__\n"
        "from serve.loading import load\n"
        f"load({str(tiny_model_dir)!r})\n"
        "bad = [m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'doge_jax'))]\n"
        "assert not bad, bad\n"
    )
    out = _run(code, {})
    assert out.returncode == 0, out.stderr[-3000:]


def test_missing_model_fails_with_a_clear_message(tmp_path):
    from serve_fixtures import _free_port

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "serve", "--model", "nobody/no-such-model", "--port", str(_free_port())],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "cannot load model 'nobody/no-such-model'" in out.stderr


@pytest.mark.parametrize("argv, message", [(["--max-batch", "0"], "max_batch=0"), (["--dtype", "int8"], "int8"),
                                           (["--dtype", "float16"], "float16"),
                                           (["--compile", "--decode-path", "dynamic"], "decode_path='dynamic'")])
def test_bad_flags(argv, message, capsys):
    from serve.__main__ import parse_args

    with pytest.raises((SystemExit, ValueError)) as exc:
        parse_args(["--model", "x", *argv])
    assert message in str(exc.value) + capsys.readouterr().err


def test_compile_without_a_cpp_compiler_is_one_line_before_loading(tmp_path):
    """--compile needs inductor's C++ compiler: without one the server says so in one line and exits 2, before
    loading anything (the model path does not even exist here)."""
    from serve_fixtures import _free_port

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "CXX": str(tmp_path / "no-such-g++"),
           "PATH": str(tmp_path)}  # nor a g++ on PATH
    out = subprocess.run([sys.executable, "-m", "serve", "--model", str(tmp_path / "absent"), "--compile", "--port",
                          str(_free_port())], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compile: torch.compile needs a C++ compiler"), lines


def test_openmp_waits_passively_before_torch_loads():
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: `python -m serve` must set it first (spinning
    workers on every core made a step 10-30x slower on a shared box), and keep a value the operator chose."""
    code = ("import os, sys; import serve.__main__; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["PASSIVE", "10000", "False"], out.stderr  # passive after a ~0.1 ms spin
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["ACTIVE", "None", "False"], out.stderr  # the operator's policy, untouched


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_no_thread_but_the_engines_gets_openmp_workers():
    """libgomp keeps a team of workers for each thread that ever ran a parallel region on several threads, and with
    more workers than cores it cuts their spinning short: importing torch and loading the model used to leave two
    such workers before the engine ran, and the int8 start-up timing then chose the slower kernels (serve/__main__.py).
    `python -m serve` makes one OpenMP thread every thread's default (the engine sets its own count), and keeps an
    operator's OMP_NUM_THREADS."""
    code = ("import os, sys, threading; import serve.__main__; import torch\n"
            "x = torch.randn(512, 512)\n"
            "def work(out):\n"
            "    for _ in range(3): (x @ x).sum(); torch.softmax(x, -1).sum(); torch.randn(1 << 20).exp().sum()\n"
            "    python = {t.native_id for t in threading.enumerate()}\n"
            "    out.append(len({int(t) for t in os.listdir('/proc/self/task')} - python))\n"
            "out = []; work(out)\n"
            "t = threading.Thread(target=work, args=(out,)); t.start(); t.join()\n"
            "print(os.environ.get('OMP_NUM_THREADS'), *out)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "0", "0"], (out.stdout, out.stderr[-2000:])  # no OpenMP worker anywhere
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "2"}, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split()[0] == "2", out.stderr[-2000:]  # the operator's count, untouched
