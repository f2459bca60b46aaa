"""A 2-process `jax.distributed` run on localhost (one CPU device each, gloo collectives, each process reading
only its own data shard) matches the 1-process run of the same two shards, and its checkpoint resumes on
one process."""

import os
import re
import socket
import subprocess
import sys

import numpy as np

import train_harness as th
from doge_jax import checkpoint as ckpt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    corpus = th.write_corpus(str(tmp_path / "c.txt"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    common = dict(total_steps=4, data_shards=2)

    single = subprocess.run([sys.executable] + th.cli_args(corpus, str(tmp_path / "one"), **common), cwd=th.REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr

    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable] + th.cli_args(
            corpus, str(tmp_path / "two"), **common, distributed__coordinator_address=f"127.0.0.1:{port}",
            distributed__num_processes=2, distributed__process_id=i),
        cwd=th.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 cpu devices [data=2 fsdp=1 tensor=1 expert=1] x 2 process(es)" in outs[0], outs[0][-2000:]
    # The memory both hosts agree on (the smallest, gathered) is this host's RAM, as the 1-process run reads it:
    # gathered as int32 bytes it wrapped modulo 4 GiB (negative on a 24 GB host).
    def ram_gb(text):
        found = re.search(r"available RAM / 1 local CPU device: ([0-9.-]+) GB", text)
        assert found, text[-2000:]
        return float(found.group(1))

    one_gb, two_gb = ram_gb(single.stdout + single.stderr), ram_gb(outs[0])  # process 0 prints the line
    assert one_gb > 0 and 0.5 * one_gb <= two_gb <= 1.5 * one_gb, (one_gb, two_gb)

    one, two = th.losses(str(tmp_path / "one")), th.losses(str(tmp_path / "two"))
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=2e-6)  # fp32, another sum order
    # Both hosts' data positions reach the checkpoint (gathered to the writer): the same as the 1-process run's,
    # so either run resumes on any number of hosts.
    from doge_jax.trainer import checkpointing

    meta_one, meta_two = (checkpointing.read_train_state(ckpt.resolve(str(tmp_path / d))) for d in ("one", "two"))
    assert meta_two["step"] == 4 and meta_two["data_shards"] == 2
    assert sorted(meta_two["data"]) == ["0", "1"]
    assert meta_two["data"] == meta_one["data"]

    # Continue both to step 6 in one process: the 2-host checkpoint resumes on 1 host with the same data.
    for name in ("one", "two"):
        more = subprocess.run([sys.executable] + th.cli_args(corpus, str(tmp_path / name), **{**common, "total_steps": 6}),
                              cwd=th.REPO, env=env, capture_output=True, text=True, timeout=300)
        assert more.returncode == 0, more.stdout + more.stderr
        assert f"resuming {tmp_path / name}/checkpoints/4" in more.stdout
    one, two = th.losses(str(tmp_path / "one")), th.losses(str(tmp_path / "two"))
    assert [s for s, _ in two] == list(range(1, 7))
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=2e-6)
