"""The train step (gradient accumulation, weighting) and the Trainer's hooks: a custom loss and batch source,
params-only init, and stopping on a non-finite loss with the last good checkpoint kept."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import train_harness as th
from doge_jax import DogeConfig, checkpoint as ckpt
from doge_jax.model import decoder as model_lib
from doge_jax.trainer import Trainer, TrainingDiverged, make_train_step, pretrain_loss

CFG = DogeConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32, keep_window_size=32)


def _batch(rng, rows, T, drop_fraction):
    ids = rng.integers(4, CFG.vocab_size, size=(rows, T)).astype(np.int32)
    targets = np.roll(ids, -1, axis=1)
    targets[:, -1] = -100
    targets[rng.random((rows, T)) < drop_fraction] = -100
    seg = np.ones((rows, T), np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy()
    return {"input_ids": ids, "targets": targets, "segment_ids": seg, "positions": pos}


def test_gradient_accumulation_equals_one_big_batch():
    """4 micro-batches of 2 rows with very different numbers of target tokens = 1 batch of 8 rows: the
    micro-batches are weighted by their token counts, so the result is the whole batch's token mean."""
    rng = np.random.default_rng(0)
    parts = [_batch(rng, 2, 16, f) for f in (0.0, 0.9, 0.3, 0.6)]
    whole = {k: np.concatenate([p[k] for p in parts])[None] for k in parts[0]}  # [1, 8, T]
    micro = {k: np.stack([p[k] for p in parts]) for k in parts[0]}  # [4, 2, T]
    model = model_lib.build(CFG, seed=3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = optax.sgd(1.0)  # new params = params − grads: compares the gradients themselves
    step = jax.jit(make_train_step(graphdef, rest, tx, lambda s: jnp.float32(1.0), pretrain_loss))

    def run(batch):
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
                 "rng": jax.random.key_data(jax.random.key(0))}
        return step(state, batch)

    (s1, m1), (s4, m4) = run(whole), run(micro)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    assert float(m1["weight"]) == float(m4["weight"]) == float((whole["targets"] != -100).sum())
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # fp32 sums in another order
    # And the loss is the plain token mean of the model on the whole batch.
    logits = model(jnp.asarray(whole["input_ids"][0])).logits
    t = whole["targets"][0]
    lp = jax.nn.log_softmax(logits)
    nll = -np.take_along_axis(np.asarray(lp), np.where(t < 0, 0, t)[..., None], -1)[..., 0]
    np.testing.assert_allclose(m1["loss"], nll[t != -100].mean(), rtol=1e-5)


class _Source:
    """A synthetic batch source: row r of batch b holds a fixed random sequence; `poison_at` marks a batch."""

    def __init__(self, poison_at=None):
        self.poison_at = poison_at

    def __call__(self, *, split, shard_index, shard_count, rows, num_batches=None):
        return _Iterator(rows, shard_index, self.poison_at, num_batches)


class _Iterator:

    def __init__(self, rows, shard, poison_at, num_batches):
        self.rows, self.shard, self.poison_at, self.num_batches, self.i = rows, shard, poison_at, num_batches, 0

    def __next__(self):
        if self.num_batches is not None and self.i >= self.num_batches:
            raise StopIteration
        rng = np.random.default_rng([self.shard, self.i % 3])  # 3 batches repeated: learnable
        self.i += 1
        ids = rng.integers(4, 64, size=(self.rows, 16)).astype(np.int32)
        poison = np.full((self.rows,), float(self.i == self.poison_at), np.float32)
        return {"ids": ids, "poison": poison}

    def __iter__(self):
        return self

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def _custom_loss(model, batch, rng):
    """A post-training-style loss: next-token CE on its own batch keys, plus a custom metric."""
    del rng
    ids = batch["ids"]
    logits = model(ids).logits[:, :-1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
    loss = jnp.mean(nll) * jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, 1.0)
    return loss, {"first_token_nll": jnp.mean(nll[:, 0])}


def _custom_config(tmp_path, **overrides):
    return th.tiny_config(str(tmp_path / "unused.txt"), **{
        "model__vocab_size": 64, "model__max_position_embeddings": 16, "model__keep_window_size": 16,
        "seq_len": 16, "batch_size": 4, "total_steps": 6, "optimizer__lr": 1e-2, **overrides})


def test_custom_loss_and_batch_source_plug_in(tmp_path):
    Trainer(_custom_config(tmp_path), str(tmp_path / "run"), loss_fn=_custom_loss, batch_source=_Source()).run()
    records = th.read_records(str(tmp_path / "run"))
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all("first_token_nll" in r for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert ckpt.resolve(str(tmp_path / "run")).step == 6


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(_custom_config(tmp_path), str(tmp_path / "run"), loss_fn=_custom_loss,
                      batch_source=_Source(poison_at=5))
    with pytest.raises(TrainingDiverged, match=r"loss=nan .* at step 5: .*checkpoints/4"):
        trainer.run()
    steps = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert steps == ["2", "4"], steps  # step 5 (NaN) and later never saved
    assert ckpt.resolve(str(tmp_path / "run")).step == 4


def test_init_from_loads_params_only(tmp_path):
    """init_from a params-only checkpoint (what `convert from-hf` writes): the first loss is that model's loss,
    the step restarts at 0 with warmup, and the run's own seed does not matter."""
    corpus = th.write_corpus(str(tmp_path / "c.txt"))
    base = dict(total_steps=1, checkpoint__every_steps=0, data__shuffle=False)
    scratch = th.tiny_config(corpus, seed=7, **base)
    Trainer(scratch, str(tmp_path / "scratch")).run()
    model_cfg = DogeConfig.from_dict(scratch.model.to_dict()).replace(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    ckpt.save_params(str(tmp_path / "imported"), 0, ckpt.params_of(model_lib.build(model_cfg, seed=7)), model_cfg)
    Trainer(th.tiny_config(corpus, seed=0, init_from=str(tmp_path / "imported"), **base), str(tmp_path / "ft")).run()
    a, b = th.read_records(str(tmp_path / "scratch"))[0], th.read_records(str(tmp_path / "ft"))[0]
    assert a["step"] == b["step"] == 1
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


def test_dropout_masks_follow_the_run_rng():
    """With dropout, the masks are a function of (run rng, step, micro-batch): the same state gives the same
    loss (so resume is exact), another run rng another loss."""
    from doge_jax.trainer.loop import _concrete

    cfg = CFG.replace(hidden_dropout=0.3, attention_dropout=0.3)
    model = model_lib.abstract_model(cfg)
    model.train()
    graphdef, abstract_params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(nnx.state(model_lib.build(cfg, seed=3), nnx.Param))
    tx = optax.sgd(1e-3)
    step = jax.jit(make_train_step(graphdef, _concrete(rest), tx, lambda s: jnp.float32(1e-3), pretrain_loss))
    batch = {k: v[None] for k, v in _batch(np.random.default_rng(1), 2, 16, 0.0).items()}

    def loss(seed):
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(5),
                 "rng": jax.random.key_data(jax.random.key(seed))}
        return float(step(state, batch)[1]["loss"])

    assert loss(0) == loss(0)
    assert loss(0) != loss(1)
