"""Evaluation: one model, three routes, one answer (doge_jax LM, lm-eval's `hf` on the export, lm-eval's
`local-completions` against `python -m serve`), rolling log-likelihood = training loss, the server's echoed
logprobs = the JAX model's, generation with stop sequences, the lm_eval CLI through the plugin hook, and the
model card's model-index. Everything offline: the model, the task YAML and its data are written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convert
import doge_jax
from doge_jax import checkpoint as ckpt
from doge_jax.model import decoder as model_lib
from doge_jax.data import load_tokenizer
from doge_jax.eval import api, results
from doge_jax.eval.lm import DogeJaxLM
from doge_jax.eval.scoring import Scorer
from serve_fixtures import ServerProcess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "doge_test_mc"
# keep_window_size = max positions: the DMA top-k never binds, so transformers' arbitrary tie-breaking among
# repeated tokens (README, "Top-k ties") cannot separate the routes; tests/test_parity.py covers the top-k path.
TINY = dict(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, keep_window_size=128, bos_token_id=1, eos_token_id=2,
            pad_token_id=3)
LL_TOL = 1e-3  # per-choice log-likelihood, absolute (measured: a few 1e-6)

_SUBJECTS = ["the model", "a python function", "the data file", "every token", "the mesh", "this module"]
_VERBS = ["returns", "reads", "writes", "splits", "checks", "stores"]
_OBJECTS = ["a list of numbers", "the loss value", "one string", "the key and the value", "an error", "the path"]


def _documents(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        subject, verb = rng.choice(_SUBJECTS), rng.choice(_VERBS)
        choices = [str(c) for c in rng.choice(_OBJECTS, size=4, replace=False)]
        docs.append({"question": f"What {verb} {subject}?", "choices": choices, "answer": int(rng.integers(4))})
    return docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny doge-jax checkpoint with the shipped tokenizer, its transformers export, and a task."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = doge_jax.DogeConfig(**TINY)
    params = ckpt.params_of(model_lib.build(cfg, seed=3))
    rng = np.random.default_rng(3)
    for layer in params["layers"].values():  # A and residuals randomised so every parameter matters
        layer["self_attn"]["A"] = jnp.asarray(rng.normal(size=layer["self_attn"]["A"].shape), jnp.float32)
        layer["input_residual"] = jnp.asarray(1 + 0.2 * rng.normal(size=(cfg.hidden_size,)), jnp.float32)
    workdir = str(tmp / "run")
    ckpt.save_params(workdir, 5, params, cfg)
    load_tokenizer("default").save_pretrained(os.path.join(workdir, ckpt.TOKENIZER))
    hf_dir = convert.to_hf(workdir, str(tmp / "hf"))

    tasks = tmp / "tasks"
    tasks.mkdir()
    data = tasks / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _documents(12, seed=0)))
    (tasks / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    model = ckpt.load_model(workdir)
    return {"workdir": workdir, "hf": hf_dir, "tasks": str(tasks), "model": model, "tmp": tmp}


def _per_choice(out: dict) -> np.ndarray:
    """[docs, choices] log-likelihoods from lm-eval's logged samples."""
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return np.array([[r[0][0] for r in s["resps"]] for s in samples], np.float64)


def _acc(out: dict) -> tuple[float, float]:
    r = out["results"][TASK]
    return r["acc,none"], r["acc_norm,none"]


@pytest.fixture(scope="module")
def jax_route(setup):
    lm = DogeJaxLM(checkpoint=setup["workdir"], batch_size=8)
    return lm, api.evaluate(lm, [TASK], include_path=setup["tasks"], log_samples=True)


@pytest.fixture(scope="module")
def hf_route(setup):
    return _lm_eval(setup, "hf", f"pretrained={setup['hf']},dtype=float32,device=cpu,batch_size=8")


def _lm_eval(setup, model: str, model_args: str) -> dict:
    import lm_eval

    return dict(lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                                        task_manager=api.task_manager(setup["tasks"])))


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    # float32: the server's logprobs must equal the JAX scorer's to 1e-4 (bf16 linears move them by ~1e-3)
    proc = ServerProcess(setup["hf"], tmp_path_factory.mktemp("logs") / "serve.log", "--threads", "1",
                         "--dtype", "float32")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_three_routes_one_answer(setup, jax_route, hf_route, server):
    _, jax_out = jax_route
    api_out = _lm_eval(setup, "local-completions",
                       f"model=tiny-doge,base_url={server.url}/v1/completions,tokenizer={setup['hf']},"
                       "tokenizer_backend=huggingface,tokenized_requests=True,max_length=128,max_retries=1")
    ll_jax, ll_hf, ll_api = (_per_choice(o) for o in (jax_out, hf_route, api_out))
    assert ll_jax.shape == (12, 4) and np.all(ll_jax < 0)
    np.testing.assert_allclose(ll_jax, ll_hf, atol=LL_TOL, rtol=0)
    np.testing.assert_allclose(ll_api, ll_hf, atol=LL_TOL, rtol=0)
    assert _acc(jax_out) == _acc(hf_route) == _acc(api_out)
    # A random model is near chance; the test must still be able to tell choices apart.
    assert len({tuple(np.argsort(row)) for row in ll_jax}) > 1


def test_rolling_loglikelihood_is_the_training_loss(setup, jax_route):
    from lm_eval.api.instance import Instance

    lm, _ = jax_route
    short = "The model reads the data file and returns a list of numbers. " * 3
    long = " ".join(d["question"] + " " + " ".join(d["choices"]) for d in _documents(20, seed=1))
    reqs = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate([short, long])]
    rolled = lm.loglikelihood_rolling(reqs, disable_tqdm=True)

    tokens = lm.tok_encode(short)
    full = jnp.asarray([[lm.prefix_token_id] + tokens], jnp.int32)
    loss = float(doge_jax.causal_lm_loss(setup["model"](full).logits, full))
    assert len(tokens) + 1 <= lm.max_length
    np.testing.assert_allclose(-rolled[0] / len(tokens), loss, rtol=1e-5)

    # Past max_length the document is scored in windows: the same windows as lm-eval's hf backend.
    assert len(lm.tok_encode(long)) > 2 * lm.max_length
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=setup["hf"], dtype="float32", device="cpu", batch_size=4)
    np.testing.assert_allclose(rolled, hf.loglikelihood_rolling(reqs, disable_tqdm=True), atol=LL_TOL, rtol=0)


def test_server_echo_logprobs_match_jax(setup, server):
    import openai

    tok = load_tokenizer("default")
    ids = tok.encode("Question: What returns the model?\nAnswer: the loss value")
    scorer = Scorer(setup["model"], pad_id=3)
    ((want, greedy),) = scorer([(ids, len(ids) - 1)])
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        only = client.completions.create(model="tiny-doge", prompt=ids, max_tokens=0, echo=True, logprobs=2)
        plus = client.completions.create(model="tiny-doge", prompt=ids, max_tokens=3, echo=True, logprobs=1,
                                         temperature=0)
        chunks = list(client.completions.create(model="tiny-doge", prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                                stream=True))
    lp = only.choices[0].logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4, rtol=0)
    assert "".join(lp.tokens) == only.choices[0].text
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    for t in range(1, len(ids)):  # top-2 holds the argmax: greedy tokens carry the largest logprob
        assert len(lp.top_logprobs[t]) == 2
        assert (max(lp.top_logprobs[t].values()) == pytest.approx(lp.token_logprobs[t], abs=1e-6)) == greedy[t - 1]
    assert only.choices[0].finish_reason == "length" and only.usage.completion_tokens == 0

    # Streamed, the echo (text and logprobs) is the first chunk; the last one says why it ended.
    assert chunks[0].choices[0].text == only.choices[0].text
    np.testing.assert_allclose(chunks[0].choices[0].logprobs.token_logprobs[1:], want, atol=1e-4, rtol=0)
    assert chunks[-1].choices[0].finish_reason == "length"

    lp2 = plus.choices[0].logprobs
    assert len(lp2.tokens) == len(ids) + plus.usage.completion_tokens
    np.testing.assert_allclose(lp2.token_logprobs[1:len(ids)], want, atol=1e-4, rtol=0)
    assert plus.choices[0].text == only.choices[0].text + "".join(lp2.tokens[len(ids):])
    assert lp2.text_offset[len(ids)] == len(only.choices[0].text)


def test_max_tokens_zero_needs_echo(server):
    import httpx

    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny-doge", "prompt": "Hi", "max_tokens": 0},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_generate_until_matches_hf_greedy(setup, jax_route):
    """Greedy generation with a stop sequence: the same text as lm-eval's hf backend."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm, _ = jax_route
    prompts = ["Question: What reads the mesh?\nAnswer:", "The data file", "Every token writes"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
    ours = lm.generate_until(reqs, disable_tqdm=True)
    hf = HFLM(pretrained=setup["hf"], dtype="float32", device="cpu", batch_size=1)
    assert ours == hf.generate_until(reqs, disable_tqdm=True)
    assert all("\n" not in o and "." not in o for o in ours)


def test_lm_eval_cli_through_the_plugin_hook(setup, jax_route, tmp_path):
    """`lm_eval --model doge_jax`: the .pth hook's line, then lm-eval's own CLI, in a fresh interpreter."""
    _, jax_out = jax_route
    with open(os.path.join(REPO, "doge_jax_lm_eval.pth")) as f:
        hook = f.read().strip()
    code = f"{hook}\nimport sys\nfrom lm_eval.__main__ import cli_evaluate\nsys.exit(cli_evaluate())"
    cmd = [sys.executable, "-c", code, "run", "--model", "doge_jax", "--model_args",
           f"checkpoint={setup['workdir']}", "--batch_size", "8", "--tasks", TASK, "--include_path", setup["tasks"],
           "--output_path", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.startswith("results_")]
    with open(found) as f:
        assert _acc(json.load(f)) == _acc(jax_out)


def test_results_table_and_model_card(setup, jax_route, tmp_path):
    _, jax_out = jax_route
    flat = results.flatten(jax_out)
    assert flat[f"eval/{TASK}/acc"] == jax_out["results"][TASK]["acc,none"]
    assert not any("stderr" in k for k in flat)
    results.write(jax_out, str(tmp_path / "out"), workdir=setup["workdir"], name="tiny", step=5)
    assert f"| {TASK} |" in (tmp_path / "out" / "results.md").read_text()
    hf_dir = convert.to_hf(setup["workdir"], str(tmp_path / "hf"))
    card = open(os.path.join(hf_dir, "README.md")).read()
    import yaml

    meta = yaml.safe_load(card.split("---")[1])
    (entry,) = meta["model-index"]
    values = {(r["dataset"]["name"], r["metrics"][0]["type"]): r["metrics"][0]["value"] for r in entry["results"]}
    assert values[(TASK, "acc")] == pytest.approx(jax_out["results"][TASK]["acc,none"], abs=1e-6)
    assert "lm-evaluation-harness 0.4" in entry["results"][0]["source"]["name"]


def test_seed_columns_and_published_rows():
    fake = {"results": {"arc_easy": {"acc_norm,none": 0.5}, "arc_challenge": {"acc_norm,none": 0.3},
                        "piqa": {"acc_norm,none": 0.6, "acc_norm_stderr,none": 0.01}}}
    row = results.seed_row(fake)
    assert row["ARC"] == pytest.approx(40.0) and row["PIQA"] == pytest.approx(60.0) and row["MMLU"] is None
    table = results.markdown(fake, "mine")
    assert "| Doge-20M (published) | 25.4 | 29.8 | 58.4 | 27.3 | 50.2 |" in table
    assert "| mine | – | 40.0 | 60.0 | – | – |" in table


def test_shipped_groups_name_real_tasks(setup):
    manager = api.task_manager(setup["tasks"])  # the module's cached manager: indexing lm-eval's tasks takes ~15 s
    assert {"doge_base", "doge_instruct"} <= set(manager.all_tasks)
    import yaml

    for group in ("doge_base", "doge_instruct"):
        with open(os.path.join(api.TASKS_DIR, f"{group}.yaml")) as f:
            members = [t["task"] for t in yaml.safe_load(f)["task"]]
        assert set(members) <= set(manager.all_tasks), members


def test_tasks_that_resolve_among_ours_skip_indexing_lm_evals_own(setup, tmp_path):
    """Our tasks, and a user's, get a manager over those paths only; anything that reaches one of lm-eval's own
    tasks, directly or through a group member, gets the full index (the module's cached manager)."""
    full = api.task_manager(setup["tasks"])
    assert "arc_easy" in full.all_tasks
    for tasks in ([TASK], TASK, ["doge_offline"], ["pydoc_cloze", TASK]):
        own = api.task_manager(setup["tasks"], tasks)
        assert own is not full and "arc_easy" not in own.all_tasks and "pydoc_ppl" in own.all_tasks, tasks
    for tasks in (["doge_base"], [TASK, "arc_easy"], ["no_such_task"], []):
        assert api.task_manager(setup["tasks"], tasks) is full, tasks
    mixed = tmp_path / "mixed.yaml"  # a user's group with one of lm-eval's tasks among its members
    mixed.write_text(f"group: my_mix\ntask:\n  - {TASK}\n  - task: arc_easy\n    num_fewshot: 1\n")
    nested = tmp_path / "nested.yaml"  # a group of groups, all ours
    nested.write_text(f"group: my_nest\ntask:\n  - doge_offline\n  - task: {TASK}\n")
    paths = [setup["tasks"], str(tmp_path)]  # (managers are cached per paths: the YAMLs are written first)
    assert "arc_easy" in api.task_manager(paths, ["my_mix"]).all_tasks
    assert "arc_easy" not in api.task_manager(paths, ["my_nest"]).all_tasks


def test_bad_arguments_are_one_line_errors(setup):
    with pytest.raises(ValueError, match="tasks=\\['no_such_task'\\]"):
        api.check_tasks(["no_such_task"], api.task_manager(setup["tasks"]))
    with pytest.raises(ValueError, match="batch_size='x'"):
        DogeJaxLM(model=setup["model"], tokenizer=load_tokenizer("default"), batch_size="x")
    with pytest.raises(ValueError, match="not doge_jax arguments"):
        DogeJaxLM(model=setup["model"], tokenizer=load_tokenizer("default"), pretrained="x")
    with pytest.raises(FileNotFoundError, match="checkpoint="):
        DogeJaxLM(checkpoint=str(setup["tmp"] / "missing"))


_MESH_CHECK = """
import numpy as np, jax
from jax.sharding import Mesh
import doge_jax
from doge_jax.model import decoder as model_lib
from doge_jax.parallel import sharding as sh
from doge_jax.eval.scoring import Scorer
cfg = doge_jax.DogeConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          keep_window_size=64)
model = model_lib.build(cfg, seed=1)
mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 2, 1), sh.MESH_AXES)
rng = np.random.default_rng(0)
reqs = [(rng.integers(4, 512, size=int(rng.integers(3, 25))).tolist(), 0) for _ in range(11)]
reqs = [(t, int(rng.integers(1, len(t)))) for t, _ in reqs]
plain, sharded = Scorer(model, batch_size=4), Scorer(model, batch_size=4, mesh=mesh)
for (a, ga), (b, gb) in zip(plain(reqs), sharded(reqs)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    assert (ga == gb).all()
assert sharded.dp == 2 and all(shape[0] % 2 == 0 for shape in sharded.compiled_shapes)
print("ok", sorted(sharded.compiled_shapes))
"""


def test_scoring_on_a_mesh_equals_one_device():
    """Parameters sharded by the logical-axis table, the batch over `data`: same log-likelihoods (4 CPU devices)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", _MESH_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def test_scored_window_equals_full_logits():
    """The LM head runs only on each row's last W positions: per-token log-likelihoods and greedy flags equal a
    plain full forward of each request alone, for continuations shorter than, equal to and longer than 16, the
    whole sequence, and rows shorter than the window."""
    import jax

    import doge_jax
    from doge_jax.model import decoder as model_lib

    cfg = doge_jax.DogeConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              keep_window_size=24)
    model = model_lib.build(cfg, seed=2)
    rng = np.random.default_rng(3)
    shapes = [(70, 3), (70, 16), (70, 17), (50, 49), (9, 2), (5, 4), (40, 1), (90, 30), (12, 11), (33, 20)]
    reqs = [(rng.permutation(np.arange(4, 512))[:length].tolist(), n) for length, n in shapes]
    scorer = Scorer(model, pad_id=0, batch_size=4)
    got = scorer(reqs)
    assert any(window < length for _, length, window in scorer.compiled_shapes)  # the window path ran
    for (tokens, n), (logp, greedy) in zip(reqs, got):
        ids = np.asarray(tokens, np.int32)[None]
        full = np.asarray(jax.nn.log_softmax(model(ids[:, :-1]).logits, axis=-1))[0]  # [L - 1, V]
        want = full[np.arange(len(tokens) - 1), ids[0, 1:]][-n:]
        np.testing.assert_allclose(logp, want, atol=2e-5, rtol=0)
        np.testing.assert_array_equal(greedy, (full.argmax(-1) == ids[0, 1:])[-n:])


def test_length_buckets_keep_compiles_few():
    from doge_jax.eval.scoring import length_bucket, rows_bucket

    assert [length_bucket(n) for n in (1, 16, 17, 25, 33, 100, 2048)] == [16, 16, 24, 32, 48, 128, 2048]
    assert all(n <= length_bucket(n) <= max(16, 1.5 * n) for n in range(1, 5000))
    assert len({length_bucket(n) for n in range(1, 2049)}) == 15  # every length up to 2048: 15 programs
    assert [rows_bucket(n, 12) for n in (1, 3, 5, 12, 13)] == [1, 4, 8, 12, 12]
    assert rows_bucket(3, 12, multiple=8) == 8


def test_evaluating_again_compiles_nothing_new(setup):
    """Training evaluates every eval_every steps with a fresh DogeJaxLM: the programs are reused."""
    from doge_jax.eval import scoring

    rng = np.random.default_rng(5)
    reqs = [(rng.integers(4, 8192, size=n).tolist(), 2) for n in (5, 20, 40)]
    first = Scorer(setup["model"], pad_id=3)(reqs)
    size = scoring._compiled(None)._cache_size()
    second = Scorer(setup["model"], pad_id=3)(reqs)
    assert scoring._compiled(None)._cache_size() == size
    for (a, _), (b, _) in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_run_tasks_contract(setup, jax_route, tmp_path):
    """What training calls every eval_every steps: flat metrics for the first `limit` documents."""
    from doge_jax.eval import run_tasks

    _, jax_out = jax_route
    metrics = run_tasks(setup["model"], load_tokenizer("default"), [TASK], 5, batch_size=4,
                        include_path=setup["tasks"], workdir=str(tmp_path), step=9)
    assert set(metrics) == {f"eval/{TASK}/acc", f"eval/{TASK}/acc_norm"}
    ll = _per_choice(jax_out)[:5]
    targets = [s["target"] for s in sorted(jax_out["samples"][TASK], key=lambda s: s["doc_id"])][:5]
    assert metrics[f"eval/{TASK}/acc"] == pytest.approx(np.mean(np.argmax(ll, axis=1) == np.array(targets)))
    recorded = results.read_card_entries(str(tmp_path))
    assert recorded["step"] == 9 and recorded["limit"] == 5


def test_remote_checkpoint_copy_takes_one_step_and_the_tokenizer(setup, tmp_path):
    """The gs:// route copies through etils.epath; here the same code reads a local path (no GCS offline)."""
    from doge_jax.eval.loading import fetch_remote_checkpoint

    for src in (setup["workdir"], os.path.join(setup["workdir"], ckpt.CHECKPOINTS, "5")):
        dst = fetch_remote_checkpoint(src, str(tmp_path / os.path.basename(src)))
        assert sorted(os.listdir(os.path.join(dst, ckpt.CHECKPOINTS))) == ["5"]
        assert os.path.isdir(os.path.join(dst, ckpt.TOKENIZER))
        a, b = ckpt.params_of(ckpt.load_model(dst)), ckpt.params_of(setup["model"])
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="step=7 not in checkpoint"):
        fetch_remote_checkpoint(setup["workdir"], str(tmp_path / "x"), step=7)
