"""gs:// end to end against a real GCS server (fake-gcs-server on 127.0.0.1), configured only through
STORAGE_EMULATOR_HOST: train with the workdir on gs:// on a mixture of a gs:// jsonl source and a datasets
stream of gs:// files, kill -9, resume (losses bitwise those of an uninterrupted run on local copies), export
from gs:// to gs://, load_model from gs://; and the bad inputs, each one line with nothing written."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gcs_emulator
import train_harness as th

BUCKET = "doge"
TOTAL = 6
COMMON = dict(total_steps=TOTAL, checkpoint__every_steps=2, eval_every=0, tensorboard=True,
              data__source="jsonl", data__eval_fraction=0.05)


@pytest.fixture(scope="module")
def gcs():
    emulator = gcs_emulator.Emulator()
    emulator.create_bucket(BUCKET)
    yield emulator
    emulator.close()


def _corpus_jsonl(tmp_path) -> list[bytes]:
    text = open(th.write_corpus(str(tmp_path / "c.txt"))).read().split("\n\n")
    docs = [json.dumps({"text": t}) + "\n" for t in text if t.strip()]
    return ["".join(docs[i::2]).encode() for i in range(2)]


_MIXTURE = """
import ml_collections
from doge_jax.data import data_config_defaults


def get_config():
    c = data_config_defaults()
    c.eval_fraction = 0.05
    c.shuffle_window = 8
    c.mixture = ml_collections.ConfigDict(dict(
        files=dict(weight=2.0, source="jsonl", path="{a}"),
        stream=dict(weight=1.0, source="hf", hf_name="json", path="{b}"),
    ))
    return c
"""


def _mixture(path, a: str, b: str) -> str:
    """A data preset (for --data=) mixing a random-access jsonl source and a datasets stream, 2 : 1."""
    path.write_text(_MIXTURE.format(a=a, b=b))
    return str(path)


def _env(gcs, tmp_path):
    return {**gcs.env(), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run(args, env, timeout=300):
    return subprocess.run([sys.executable] + args, cwd=th.REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _gs_losses(gcs, prefix):
    data = gcs.read(BUCKET, f"{prefix}/metrics.jsonl") or b""
    return [json.loads(line) for line in data.decode().splitlines(keepends=True) if line.endswith("\n")]


def test_train_kill9_resume_export_and_load_on_gs(gcs, tmp_path):
    parts = _corpus_jsonl(tmp_path)
    for i, blob in enumerate(parts):
        gcs.upload(BUCKET, f"corpus/part-{i}.jsonl", blob)
        (tmp_path / f"part-{i}.jsonl").write_bytes(blob)
    env = _env(gcs, tmp_path)

    run = f"gs://{BUCKET}/run"
    args = th.cli_args("unused", run, **COMMON) + [
        "--data=" + _mixture(tmp_path / "gs_mix.py", f"gs://{BUCKET}/corpus/part-0.jsonl",
                             f"gs://{BUCKET}/corpus/part-1.jsonl")]
    with open(tmp_path / "log1", "w") as log:
        proc = subprocess.Popen([sys.executable] + args, cwd=th.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, open(tmp_path / "log1").read()
            saved = gcs.committed_steps(BUCKET, "run")
            logged = _gs_losses(gcs, "run")
            if saved and 0 < saved[-1] < TOTAL and logged and logged[-1]["step"] > saved[-1]:
                break
            assert time.time() < deadline, open(tmp_path / "log1").read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = gcs.committed_steps(BUCKET, "run")[-1]
    resumed = _run(args, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {run}/checkpoints/{killed_at}" in resumed.stdout
    # The uninterrupted reference, local files, in this process (the same compiled step: bitwise the same math).
    from doge_jax.trainer import Trainer

    local = str(tmp_path / "local")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "local_mix", _mixture(tmp_path / "local_mix.py", tmp_path / "part-0.jsonl", tmp_path / "part-1.jsonl"))
    preset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preset)
    config = th.tiny_config("unused", **COMMON)
    config.data = preset.get_config()
    Trainer(config, local).run()
    assert not os.path.exists(os.path.join(th.REPO, "gs:"))

    a, b = th.read_records(local), _gs_losses(gcs, "run")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, TOTAL + 1))
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "lr"):
            assert x.get(key) == y.get(key), (x["step"], key, x.get(key), y.get(key))
    names = gcs.names(BUCKET, "run/")
    assert "run/loss.png" in names and "run/tokenizer/tokenizer.json" in names
    assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)

    # Export from gs:// to gs://, read back over the emulator's own API; load_model from gs:// equals the local
    # run's model exactly.
    exported = _run(["-m", "convert", "to-hf", "--checkpoint", run, "--out", f"gs://{BUCKET}/export"], env)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for name in gcs.names(BUCKET, "export/"):
        (hf_dir / name.split("/", 1)[1]).write_bytes(gcs.read(BUCKET, name))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(hf_dir))
    ids = [[1, 42, 7, 99, 3, 250]]
    script = ("import sys, numpy as np, jax.numpy as jnp, doge_jax; "
              "m = doge_jax.load_model(sys.argv[1]); "
              f"np.save(sys.argv[2], np.asarray(m(jnp.array({ids})).logits))")
    loaded = _run(["-c", script, run, str(tmp_path / "gs.npy")], env)
    assert loaded.returncode == 0, loaded.stderr
    import doge_jax
    import jax.numpy as jnp

    from_gs = np.load(tmp_path / "gs.npy")
    np.testing.assert_array_equal(from_gs, np.asarray(doge_jax.load_model(local)(jnp.array(ids)).logits))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(from_gs, ref, atol=2e-4, rtol=0)

    # The exported tokenizer encodes a document the way training did: BOS, then the same ids.
    from doge_jax import data
    from doge_jax.data._pipeline import _Tokenize

    text = json.loads(parts[0].decode().splitlines()[0])["text"]
    trained = _Tokenize(data.load_tokenizer("default"), add_bos=True, add_eos=True)(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"] == trained[:-1].tolist()  # EOS ends a document


def test_unsupported_scheme_is_one_line_from_the_cli(gcs, tmp_path):
    args = th.cli_args(str(tmp_path / "none.jsonl"), "s3://bucket/run", **COMMON)
    args[2] = f"--config={th.REPO}/configs/doge_tiny.py"  # run from tmp_path: a stray local folder would show there
    result = subprocess.run([sys.executable] + args, cwd=tmp_path, env={**gcs.env(), "PYTHONPATH": th.REPO},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --workdir='s3://bucket/run': the scheme s3:// is not supported (a local path or "
                      "gs://bucket/...)"], result.stderr
    assert os.listdir(tmp_path) == []


@pytest.fixture
def emulated(gcs, monkeypatch):
    """This process pointed at the emulator the way doge-jax's import does it (STORAGE_EMULATOR_HOST alone)."""
    from doge_jax import storage

    for key in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    storage._configure_emulator()
    return gcs


@pytest.mark.parametrize("workdir, data_path, expect", [
    ("gs://no-such-bucket/run", "LOCAL", "--workdir='gs://no-such-bucket/run': the bucket 'gs://no-such-bucket' does"),
    ("gs://doge/bad", "gs://doge/nothing/*.jsonl", "config.data.path='gs://doge/nothing/*.jsonl' matched no files"),
    ("gs://doge/bad", "gs://doge/corpus/part-*.jsonl", "config.data.text_field='body' absent"),
    ("LOCAL/run", "gs://other-bucket/x/*.jsonl", "config.data.path='gs://other-bucket/x/*.jsonl': the bucket"),
])
def test_bad_storage_input_is_one_line_and_writes_nothing(emulated, tmp_path, workdir, data_path, expect):
    from doge_jax.errors import ConfigError
    from doge_jax.trainer import Trainer

    emulated.upload(BUCKET, "corpus/part-0.jsonl", b'{"text": "hello there"}\n' * 50)
    (tmp_path / "part-0.jsonl").write_bytes(b'{"text": "hello there"}\n' * 50)
    data_path = data_path.replace("LOCAL", str(tmp_path / "part-0.jsonl"))
    workdir = workdir.replace("LOCAL", str(tmp_path))
    extra = {"data__text_field": "body"} if "text_field" in expect else {}
    config = th.tiny_config(data_path, **{**COMMON, **extra})
    before = emulated.names(BUCKET)
    with pytest.raises(ConfigError) as e:
        Trainer(config, workdir).run()
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert emulated.names(BUCKET) == before
    assert sorted(os.listdir(tmp_path)) == ["part-0.jsonl"]


def test_pretokenize_to_gs_and_train_from_its_shards(emulated, tmp_path):
    """pretokenize --out gs:// (a mixture preset: one folder per component), then data.path=gs://.../*.array_record
    yields exactly the batches of the raw source."""
    from doge_jax import data
    from doge_jax.data import pretokenize

    lines = [json.dumps({"text": f"document {i} " + "word " * (i % 7)}) + "\n" for i in range(120)]
    emulated.upload(BUCKET, "raw/docs.jsonl", "".join(lines).encode())
    preset = _MIXTURE.format(a=f"gs://{BUCKET}/raw/docs.jsonl", b=f"gs://{BUCKET}/raw/docs.jsonl")
    (tmp_path / "mix.py").write_text(preset)
    assert pretokenize.main(["--data", str(tmp_path / "mix.py"), "--out", f"gs://{BUCKET}/tok", "--num-shards",
                             "2"]) == 0
    names = emulated.names(BUCKET, "tok/")
    assert {"tok/files/metadata.json", "tok/files/tokens-00000-of-00002.array_record",
            "tok/stream/tokens-00001-of-00002.array_record"} <= set(names)
    tokenizer = data.load_tokenizer("default")
    raw, shards = data.data_config_defaults(), data.data_config_defaults()
    raw.source, raw.path = "jsonl", f"gs://{BUCKET}/raw/docs.jsonl"
    shards.source, shards.path = "arrayrecord", f"gs://{BUCKET}/tok/files/*.array_record"
    a, b = (data.make_iterator(c, tokenizer, seq_len=16, batch_size=2, seed=5) for c in (raw, shards))
    for _ in range(10):
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_from_hf_out_gs_then_load_model_and_to_hf_from_it(emulated, tmp_path):
    """convert from-hf --out gs:// writes an Orbax checkpoint (+ tokenizer) that load_model and to-hf read."""
    import jax.numpy as jnp

    import convert
    import doge_jax
    from doge_jax import checkpoint as ckpt
    from doge_jax.data import load_tokenizer
    from doge_jax.model import decoder as model_lib

    cfg = doge_jax.DogeConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                              keep_window_size=16, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    workdir = str(tmp_path / "run")
    ckpt.save_params(workdir, 3, ckpt.params_of(model_lib.build(cfg, seed=1)), cfg)
    load_tokenizer("default").save_pretrained(os.path.join(workdir, ckpt.TOKENIZER))
    hf_dir = convert.to_hf(workdir, str(tmp_path / "hf"))
    out = f"gs://{BUCKET}/imported"
    assert convert.from_hf(hf_dir, out) == out
    with pytest.raises(FileExistsError):
        convert.from_hf(hf_dir, out)
    names = emulated.names(BUCKET, "imported/")
    assert "imported/tokenizer/tokenizer.json" in names and "imported/checkpoints/0/commit_success.txt" in names
    ids = jnp.array([[1, 17, 4, 300, 2]])
    np.testing.assert_array_equal(np.asarray(doge_jax.load_model(out)(ids).logits),
                                  np.asarray(doge_jax.load_model(workdir)(ids).logits))
    again = convert.to_hf(out, str(tmp_path / "hf2"))
    for name in ("config.json", "tokenizer.json"):
        assert open(os.path.join(again, name)).read() == open(os.path.join(hf_dir, name)).read()


def test_local_copy_follows_overwrites_of_the_same_size(emulated, tmp_path):
    """A gs:// shard overwritten with other bytes of the same length is fetched again (the cache is keyed by the
    object's generation, not its size); an unchanged object is not downloaded twice."""
    from doge_jax import storage

    url = f"gs://{BUCKET}/cache/shard.bin"
    cache = str(tmp_path / "cache")
    emulated.upload(BUCKET, "cache/shard.bin", b"first version")
    local = storage.local_copy(url, cache_dir=cache)
    assert open(local, "rb").read() == b"first version"
    inode = os.stat(local).st_ino
    assert storage.local_copy(url, cache_dir=cache) == local and os.stat(local).st_ino == inode  # not re-fetched
    emulated.upload(BUCKET, "cache/shard.bin", b"other version")  # same size
    assert open(storage.local_copy(url, cache_dir=cache), "rb").read() == b"other version"
    assert sorted(os.listdir(os.path.dirname(local))) == ["shard.bin", "shard.bin.version"]  # no temp files left
