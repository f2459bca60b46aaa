"""Shared fixtures for the serve tests: a tiny Doge exported to a temp dir, and real server processes.

Streams are tested against `python -m serve` under uvicorn on 127.0.0.1 (Litestar's TestClient locks up on
infinite SSE). Each server gets a free port, HF_HUB_OFFLINE=1 (nothing is downloaded), bounded start-up time,
and is killed at teardown whatever happened. Test modules import the fixtures they use from here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-doge"
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m serve ...` on a free port; `.url`, `.log()`; stop() terminates, then kills."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        # Clients in this process need a core too: the server gets one torch thread on small CI boxes.
        cmd = [sys.executable, "-m", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--served-model-name", "tiny-doge", "--log-level", "warning", *args]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> "ServerProcess":
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


_model_dirs: dict[str, Path] = {}


def _model_dir(tmp_path_factory, name: str, **kwargs) -> Path:
    """Built once per session, even when several test modules import the fixture."""
    from serve_testing import make_tiny_model_dir

    if name not in _model_dirs:
        _model_dirs[name] = make_tiny_model_dir(tmp_path_factory.mktemp("models") / name, **kwargs)
    return _model_dirs[name]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory, "tiny-doge")


@pytest.fixture(scope="session")
def tiny_model_dir_no_template(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory, "tiny-doge-plain", chat_template=False)


_servers: dict[str, ServerProcess] = {}


def _session_server(request, tmp_path_factory, name: str, model_dir: Path, *args: str) -> ServerProcess:
    """One process per `name` for the whole session, even when several test modules import the fixture."""
    if name not in _servers:
        log_dir = tmp_path_factory.mktemp("logs")
        server = ServerProcess(model_dir, log_dir / f"{name}.log", *args)
        _servers[name] = server
        request.config.add_cleanup(server.stop)
        server.wait_ready()
    return _servers[name]


@pytest.fixture(scope="session")
def server(request, tmp_path_factory, tiny_model_dir) -> ServerProcess:
    """The main server: chat template, batches of up to 8, open (no API key)."""
    return _session_server(request, tmp_path_factory, "main", tiny_model_dir, "--max-batch", "8", "--threads", "1")


@pytest.fixture(scope="session")
def strict_server(request, tmp_path_factory, tiny_model_dir_no_template) -> ServerProcess:
    """No chat template, an API key, and room for exactly one sequence (so a second request gets 429)."""
    return _session_server(request, tmp_path_factory, "strict", tiny_model_dir_no_template, "--api-key", API_KEY,
                           "--max-batch", "1", "--max-queue", "0", "--threads", "1")


@pytest.fixture()
def client(server):
    import openai

    # max_retries=0: a test must see the server's first answer, not the SDK's retry of it.
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture()
def strict_client(strict_server):
    import openai

    with openai.OpenAI(base_url=strict_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def metric(server: ServerProcess, name: str) -> float:
    """The value of one unlabelled sample on /metrics."""
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
