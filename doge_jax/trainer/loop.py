"""The Trainer: sets a run up on a mesh, starts or resumes it, and runs the train loop.

    Trainer(config, workdir).run()                               # pretraining (doge_jax.train)
    Trainer(config, workdir, loss_fn=dpo_loss, batch_source=pairs, tokenizer=tok,
            frozen={"reference": REF_CKPT}).run()                                          # a later stage

Where a run starts, in order: the latest checkpoint in WORKDIR (automatic resume: params, optimizer, step,
RNG, data position); else `config.resume_from` (the same, from another run: branch a decay off a stable-phase
checkpoint); else `config.init_from` (params only, fresh optimizer at step 0: fine-tuning, or a model from
`convert from-hf`); else a fresh initialisation from `config.seed`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from doge_jax import checkpoint as ckpt, storage
from doge_jax.kernels import target
from doge_jax.model import decoder as model_lib
from doge_jax.parallel import sharding as sh
from doge_jax.trainer import checkpointing, fit, flops, metrics, optim, step as step_lib, validate
from doge_jax.trainer.batches import BatchSource, ShardedBatches, microbatch_sharding
from doge_jax.trainer.mesh import data_parallel_size, make_mesh
from doge_jax.trainer.validate import ConfigError

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read it as "killed", so a requeue policy reruns the job
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C, after the checkpoint (a shell reads it as "interrupted")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedAtOnce(RuntimeError):
    """A second SIGTERM / SIGINT (Ctrl-C) during a run: it stopped without finishing the step in progress; the
    message names the last checkpoint, which is intact."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the message names the last good checkpoint."""


class OutOfMemory(RuntimeError):
    """A step ran out of device memory anyway: one line with the measured peak, the limit and an N that fits."""


def _is_out_of_memory(e: Exception) -> bool:
    return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


def _data_error(e: ValueError) -> ConfigError:
    """A data pipeline error as a ConfigError (exit 2). Bad config values already are one, with their field."""
    return e if isinstance(e, ConfigError) else ConfigError(str(e))


def pretrain_source(config, tokenizer) -> BatchSource:
    """The pretraining batch source: doge_jax.data's packed grain pipeline over config.data."""
    from doge_jax import data

    def make(*, split, shard_index, shard_count, rows, num_batches=None):
        try:
            return data.make_iterator(config.data, tokenizer, seq_len=config.seq_len, batch_size=rows, split=split,
                                      process_index=shard_index, process_count=shard_count, seed=config.seed,
                                      num_batches=num_batches)
        except ValueError as e:
            raise _data_error(e) from None

    return make


def _concrete(state) -> dict:
    """Abstract non-Param model state (RNG streams) → a pure dict of placeholder values; the step reseeds
    them. Values, not Variables: the step's merge must create its Variables inside the trace it mutates in."""
    return jax.tree.map(ckpt.placeholder, nnx.to_pure_dict(state))


class Trainer:

    def __init__(self, config, workdir: str, *, loss_fn: step_lib.LossFn | None = None,
                 batch_source: BatchSource | None = None, tokenizer=None, mesh=None,
                 frozen: dict[str, str] | None = None):
        """config: the ml_collections config (configs/base.py); workdir: where checkpoints, the tokenizer and
        the logs go. loss_fn(model, micro_batch, rng, **frozen models) -> (loss, metrics) and batch_source (see
        batches.py) replace pretraining's; tokenizer is saved into WORKDIR/tokenizer (default:
        config.data.tokenizer). frozen: {loss_fn keyword: checkpoint} of models the loss reads but does not
        train (the DPO / GRPO reference): architecture from the checkpoint, runtime fields from config.model,
        parameters loaded sharded by the policy's rules and passed to the jitted step as an argument."""
        self.config = config
        self.workdir = str(storage.path(workdir, field="--workdir"))  # a gs:// URL stays one
        self.loss_fn = loss_fn or functools.partial(step_lib.pretrain_loss, z_loss_coef=config.z_loss_coef,
                                                    loss_chunk_tokens=config.loss_chunk_tokens)
        self._batch_source, self.tokenizer, self._mesh = batch_source, tokenizer, mesh
        self._frozen_paths = dict(frozen or {})
        validate.check(config, validate.model_config(config.model))
        self._saving = False  # a checkpoint save is being started: a second signal waits for it (_checkpoint)
        self._stop_now = False
        self.stop_signal: int | None = None  # the first SIGTERM / SIGINT received during run()
        self.stopped = False  # set by run(): stopped by SIGTERM / SIGINT / preemption rather than finished

    # ----------------------------------------------------------------------------------------------------- setup
    def _where_to_start(self):
        cfg = self.config
        latest = checkpointing.latest_step(self.workdir)
        if latest is not None:
            return "resume", ckpt.CheckpointRef(checkpointing.checkpoints_root(self.workdir), latest)
        for kind, field in (("resume", "resume_from"), ("init", "init_from")):
            if cfg[field]:
                try:
                    return kind, ckpt.resolve(cfg[field])
                except (FileNotFoundError, ValueError) as e:
                    raise ConfigError(f"config.{field}: {e}") from None
        return "scratch", None

    def _model_config(self, kind, ref):
        cfg = self.config
        model_cfg = validate.model_config(cfg.model)
        if self.tokenizer is not None:  # the ids travel with the checkpoint into config.json / generation_config
            ids = {f"{t}_token_id": getattr(self.tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "pad")}
            model_cfg = model_cfg.replace(**{k: v for k, v in ids.items()
                                             if v is not None and getattr(model_cfg, k) is None})
        if ref is not None:
            stored = ckpt.load_config(ref)
            diff = validate.architecture_diff(model_cfg, stored)
            if kind == "resume" and diff:
                name, mine, theirs = diff[0]
                raise ConfigError(f"config.model.{name}={mine!r} but the checkpoint {ref.root}/{ref.step} has "
                                  f"{theirs!r}; resume with the same model or use a new --workdir")
            if kind == "init" and diff:
                logging.info("init_from %s: architecture from the checkpoint (%s)", ref.root,
                             ", ".join(f"{n}={t!r}" for n, _, t in diff))
            model_cfg = validate.with_runtime_fields(stored, cfg.model)
        if self.tokenizer is not None and len(self.tokenizer) > model_cfg.vocab_size:
            raise ConfigError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the "
                              f"{len(self.tokenizer)} tokens of config.data.tokenizer={cfg.data.tokenizer!r}")
        if cfg.seq_len > model_cfg.max_position_embeddings:
            raise ConfigError(f"config.seq_len={cfg.seq_len} exceeds max_position_embeddings="
                              f"{model_cfg.max_position_embeddings} of the model")
        return model_cfg

    def _save_tokenizer(self):
        """WORKDIR/tokenizer (written whole, then renamed or uploaded): what `convert to-hf` ships. It encodes
        as training did: BOS first when config.data.add_bos (doge_jax.data.tokenizer.save_for_export)."""
        from doge_jax.data.tokenizer import save_for_export

        out = storage.join(self.workdir, ckpt.TOKENIZER)
        if self.tokenizer is None or storage.path(out).is_dir() or jax.process_index() != 0:
            return
        add_bos = bool(self.config.data.add_bos) if "data" in self.config else None
        with storage.local_folder(out) as tmp:
            save_for_export(self.tokenizer, tmp, add_bos=add_bos)

    def _setup(self):
        cfg = self.config
        self.mesh = self._mesh or make_mesh(cfg.mesh)
        self.replicated = NamedSharding(self.mesh, P())
        storage.check_reachable(self.workdir, field="--workdir")  # reads only: a bad run writes nothing
        self.start_kind, self.start_ref = self._where_to_start()
        if self.start_kind == "resume" and not checkpointing.is_train_checkpoint(self.start_ref):
            raise ConfigError(f"{self.start_ref.root}/{self.start_ref.step} holds params only (no optimizer or data "
                              "state): start from it with --config.init_from=<it> and a new --workdir")
        self.saved_meta = checkpointing.read_train_state(self.start_ref) if self.start_kind == "resume" else None

        if self._batch_source is None:
            if self.tokenizer is None:
                from doge_jax import data

                try:
                    self.tokenizer = data.load_tokenizer(cfg.data.tokenizer)
                except ValueError as e:
                    raise _data_error(e) from None
            self._batch_source = pretrain_source(cfg, self.tokenizer)
        self.model_cfg = self._model_config(self.start_kind, self.start_ref)

        saved_shards = self.saved_meta["data_shards"] if self.saved_meta else None
        self.data_shards = cfg.data_shards or saved_shards or jax.process_count()
        if saved_shards is not None and self.data_shards != saved_shards:
            raise ConfigError(f"config.data_shards={cfg.data_shards} but the checkpoint was written with "
                              f"{saved_shards} data shards; keep it (or 0) to resume the same data stream")
        self.data_parallel = data_parallel_size(self.mesh)
        self.row_multiple = validate.check_parallelism(cfg, data_parallel=self.data_parallel,
                                                       data_shards=self.data_shards)
        # "auto": provisional until _fit_step() has compiled the step (the data is checked with this split first;
        # a step's rows do not depend on the split, batches.ShardedBatches.resplit).
        self.auto_micro = cfg.grad_accum_steps == "auto"
        self.num_micro = (fit.candidates(cfg.batch_size, self.row_multiple)[0] if self.auto_micro
                          else cfg.grad_accum_steps)
        self.micro_rows = cfg.batch_size // self.num_micro
        self.fit_choice = None

        # The model split once: graphdef (static), abstract params, other state (RNG streams, when dropout).
        train_model = model_lib.abstract_model(self.model_cfg)
        train_model.train()
        self.graphdef, abstract_params, self.rest_abstract = nnx.split(train_model, nnx.Param, ...)
        eval_model = model_lib.abstract_model(self.model_cfg)
        eval_model.eval()
        self.eval_graphdef = nnx.split(eval_model, nnx.Param, ...)[0]
        self.param_sharding = nnx.to_pure_dict(sh.state_shardings(abstract_params, self.mesh))
        self.abstract_params = nnx.to_pure_dict(abstract_params)

        self.tx, self.schedule = optim.make_optimizer(cfg)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        opt_sharding = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, self.param_sharding,
                                             transform_non_params=lambda _: self.replicated)
        self.state_sharding = {"params": self.param_sharding, "opt_state": opt_sharding,
                               "step": self.replicated, "rng": self.replicated}
        self.abstract_opt = abstract_opt
        self.batch_sharding = microbatch_sharding(self.mesh)
        self._setup_frozen()

    def _setup_frozen(self):
        """Each frozen model in eval mode, abstract: its graphdef, and its params' shapes and shardings."""
        self.frozen_defs, self.frozen_abstract, self.frozen_sharding, self._frozen_refs = {}, {}, {}, {}
        for name, path in self._frozen_paths.items():
            try:
                ref = ckpt.resolve(path)
                model_cfg = validate.with_runtime_fields(ckpt.load_config(ref), self.config.model)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"frozen model {name!r} ({path}): {e}") from None
            model = model_lib.abstract_model(model_cfg)
            model.eval()
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            self.frozen_defs[name] = (graphdef, _concrete(rest))
            self.frozen_sharding[name] = nnx.to_pure_dict(sh.state_shardings(params, self.mesh))
            self.frozen_abstract[name] = nnx.to_pure_dict(params)
            self._frozen_refs[name] = ref

    def _load_frozen(self) -> dict:
        return {name: ckpt.load_params(ref, self.frozen_abstract[name], self.frozen_sharding[name])
                for name, ref in self._frozen_refs.items()}

    # ------------------------------------------------------------------------------------------------ the state
    def _init_state(self) -> dict:
        cfg, model_cfg, tx = self.config, self.model_cfg, self.tx

        def init():
            model = model_lib.build(model_cfg, seed=cfg.seed)
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                    "rng": jax.random.key_data(jax.random.key(cfg.seed + 1))}

        return jax.jit(init, out_shardings=self.state_sharding)()

    def _replicated_array(self, value) -> jax.Array:
        """A small host value on every device (works when other processes hold some of the devices)."""
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, self.replicated, lambda index: value[index])

    def _from_params(self, ref) -> dict:
        params = ckpt.load_params(ref, self.abstract_params, self.param_sharding)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding["opt_state"])(params)
        rng = jax.random.key_data(jax.random.key(self.config.seed + 1))
        return {"params": params, "opt_state": opt_state, "step": self._replicated_array(np.int32(0)),
                "rng": self._replicated_array(jax.device_get(rng))}

    def _restore(self, ref) -> dict:
        target = {"params": _sds(self.abstract_params, self.param_sharding),
                  "opt_state": _sds(self.abstract_opt, self.state_sharding["opt_state"])}
        restored, meta = checkpointing.restore(ref, target)
        return {**restored, "step": self._replicated_array(np.int32(meta["step"])),
                "rng": self._replicated_array(np.asarray(meta["rng"], np.uint32))}

    def _train_meta(self, state: dict, batches: ShardedBatches) -> dict:
        data_states = {}
        for part in checkpointing.gather_json(batches.state()):
            data_states.update(part)
        return {"step": int(state["step"]), "rng": [int(x) for x in np.asarray(jax.device_get(state["rng"]))],
                "data_shards": self.data_shards, "data": data_states}

    # ------------------------------------------------------------------------------------------------- the loop
    def _request_stop(self, signum, frame):
        del frame
        if self.stop_signal is not None:
            if self._saving:
                self._stop_now = True  # _checkpoint raises once its save has started
                return
            raise StoppedAtOnce(signum)  # run() words it
        self.stop_signal = signum
        logging.warning("%s: saving a checkpoint after this step, then stopping (send it again, or press Ctrl-C "
                        "again, to stop at once: the step in progress is lost, the last checkpoint stays)",
                        signal.Signals(signum).name)

    def _should_stop(self, step: int) -> bool:
        stop = self.stop_signal is not None
        if jax.process_count() > 1:  # every host must stop at the same step
            stop = bool(multihost_utils.process_allgather(np.asarray(stop)).any())
        return stop or self.checkpointer.mngr.reached_preemption(step)

    def _eval_batches(self) -> ShardedBatches:
        """A fresh pass over the eval split: config.eval_batches batches on every process (padded when short)."""
        return ShardedBatches(self._batch_source, mesh=self.mesh, split="eval", num_micro=1, rows=self.micro_rows,
                              num_shards=self.data_shards, num_batches=self.config.eval_batches)

    def _evaluate(self, params) -> dict:
        sums = None
        for batch in self._eval_batches():
            out = self.eval_step(params, batch)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        sums = jax.device_get(sums)
        weight = max(float(sums.pop(step_lib.WEIGHT)), 1e-9)
        result = {f"eval_{k}": float(v) / weight for k, v in sums.items()}
        result["eval_ppl"] = math.exp(min(result.get("eval_ce_loss", result["eval_loss"]), 80.0))
        return result

    def _eval_tasks(self, params, step: int) -> dict:
        """config.eval_tasks through lm-evaluation-harness on the training mesh: {"eval/<task>/<metric>": value};
        WORKDIR/eval_results.json keeps the latest, for `convert to-hf`'s model card."""
        cfg = self.config
        tasks = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]
        if not tasks:
            return {}
        from doge_jax.eval import run_tasks

        model = nnx.merge(self.eval_graphdef, params, _concrete(self.rest_abstract))
        return run_tasks(model, self.tokenizer, tasks, cfg.eval_tasks_limit or None, mesh=self.mesh,
                         workdir=self.workdir, step=step)

    def run(self) -> dict:
        """Trains to config.total_steps, or until SIGTERM or SIGINT (Ctrl-C): the first one stops the run after the
        step in progress, with a checkpoint; a second one stops it at once (`StoppedAtOnce`, the last checkpoint
        intact). Returns the last logged record."""
        cfg = self.config
        self._setup()
        batches = self._train_batches()
        self._compile_steps()
        self._fit_step(batches)  # before anything is written: a step that cannot fit stops the run here
        self.checkpointer = checkpointing.Checkpointer(self.workdir, keep=cfg.checkpoint.keep,  # creates WORKDIR
                                                       async_save=cfg.checkpoint.async_save)
        self._save_tokenizer()
        state = self._start_state()
        self.frozen_params = self._load_frozen()
        run = _RunState(start=int(state["step"]), last_saved=None)
        run.last_saved = run.start if self.start_kind == "resume" else None
        self._open_log(run)
        if run.start >= cfg.total_steps:
            self.log.info(f"nothing to do: step {run.start} >= config.total_steps={cfg.total_steps}")
            self.log.close()
            self.checkpointer.close()
            return {}

        on_main_thread = threading.current_thread() is threading.main_thread()
        if on_main_thread:
            previous_handlers = {s: signal.signal(s, self._request_stop) for s in STOP_SIGNALS}
        step = run.start
        try:
            while step < cfg.total_steps:
                try:
                    state, step = self._step(state, step, batches, run)
                except StopIteration:
                    self.log.info(f"the training data ran out after step {step}")
                    break
                except jax.errors.JaxRuntimeError as e:
                    if _is_out_of_memory(e):
                        raise self._out_of_memory(step + 1, run) from None
                    raise
                run.stopped = self._should_stop(step)
                try:
                    self._eval_and_checkpoint(state, step, batches, run)
                except jax.errors.JaxRuntimeError as e:  # a step's error surfaces when its metrics are read
                    if _is_out_of_memory(e):
                        raise self._out_of_memory(step, run) from None
                    raise
                if run.stopped:
                    break
            if run.pending is not None:
                try:
                    self._log(self._record(*run.pending, run), run, force=True)
                except jax.errors.JaxRuntimeError as e:
                    if _is_out_of_memory(e):
                        raise self._out_of_memory(step, run) from None
                    raise
            if run.last_saved != step:
                self._checkpoint(state, step, batches, run)
            self.checkpointer.close()
        except StoppedAtOnce:
            for s in STOP_SIGNALS if on_main_thread else ():
                signal.signal(s, signal.SIG_IGN)  # the saves already started finish before it exits
            self.checkpointer.close()
            # No step number for the work lost: steps are dispatched ahead, so the one the device was running is
            # not the loop's count. What matters is where a rerun resumes.
            saved = run.last_saved
            good = (f"the steps after step {saved} are not saved; the last checkpoint, step {saved}, "
                    f"{self.checkpointer.root}/{saved}, is intact: rerun the same command to resume from it"
                    if saved is not None else "no checkpoint was written yet, so no step of this run is saved")
            name = signal.Signals(self.stop_signal).name
            raise StoppedAtOnce(f"stopped at once by a second {name}: {good}") from None
        finally:
            self.log.close()
            if on_main_thread:
                for s, handler in previous_handlers.items():
                    signal.signal(s, handler)
        self._finish(step, run.stopped)
        return run.last_record

    # ------------------------------------------------------------------------------------------ the run's steps
    def _train_batches(self) -> ShardedBatches:
        """The data first: a bad data config fails before anything compiles."""
        batches = ShardedBatches(self._batch_source, mesh=self.mesh, split="train", num_micro=self.num_micro,
                                 rows=self.micro_rows, num_shards=self.data_shards)
        if self.saved_meta is not None:
            batches.set_state(self.saved_meta["data"])
        if self.config.eval_every > 0:  # an eval split without documents fails now, not at the first eval
            self._eval_batches()
        return batches

    def _start_state(self) -> dict:
        if self.start_kind == "resume":
            return self._restore(self.start_ref)
        if self.start_kind == "init":
            return self._from_params(self.start_ref)
        return self._init_state()

    def _compile_steps(self) -> None:
        train_step = step_lib.make_train_step(self.graphdef, _concrete(self.rest_abstract), self.tx, self.schedule,
                                              self.loss_fn, self.frozen_defs)
        self.jitted_train_step = jax.jit(
            train_step, in_shardings=(self.state_sharding, self.batch_sharding, self.frozen_sharding),
            out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
        train_step = _traced_under_mesh(self.jitted_train_step, self.mesh)
        self.train_step = lambda state, batch: train_step(state, batch, self.frozen_params)
        eval_fn = step_lib.make_eval_step(self.eval_graphdef, _concrete(self.rest_abstract), self.loss_fn,
                                          self.frozen_defs)
        eval_step = _traced_under_mesh(
            jax.jit(lambda p, b, f: eval_fn(p, jax.tree.map(lambda x: x[0], b), f),
                    in_shardings=(self.param_sharding, self.batch_sharding, self.frozen_sharding),
                    out_shardings=self.replicated), self.mesh)
        self.eval_step = lambda params, batch: eval_step(params, batch, self.frozen_params)

    def _abstract_step_inputs(self, batch: dict) -> tuple[dict, dict, dict]:
        """(state, batch, frozen params) as ShapeDtypeStructs with the run's shardings; batch {name: [A, M, ...]}."""
        key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        state = {"params": _sds(self.abstract_params, self.param_sharding),
                 "opt_state": _sds(self.abstract_opt, self.state_sharding["opt_state"]),
                 "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
                 "rng": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=self.replicated)}
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in batch.items()}
        return state, batch, _sds(self.frozen_abstract, self.frozen_sharding)

    def _compile_at(self, num_micro: int, names_dtypes: dict):
        """The train step compiled ahead of time for num_micro micro-batches of the global batch."""
        cfg = self.config
        shape = (num_micro, cfg.batch_size // num_micro)
        batch = {k: jax.ShapeDtypeStruct(shape + tail, dtype) for k, (tail, dtype) in names_dtypes.items()}
        with jax.set_mesh(self.mesh):
            return self.jitted_train_step.lower(*self._abstract_step_inputs(batch)).compile()

    def _fit_step(self, batches: ShardedBatches) -> None:
        """Compiles the step before step 1 (the executable the run then uses) and, with grad_accum_steps "auto",
        chooses the fewest micro-batches whose step fits the device (doge_jax/trainer/fit.py); one line says
        what and why. Raises ConfigError when nothing fits."""
        cfg = self.config
        sample = batches.peek_spec()  # name → (per-row shape after the row axis, dtype)
        self.memory = fit.device_memory(self.mesh.devices.flat, cfg.memory_limit_gb)
        compile_step = lambda a: self._compile_at(a, sample)  # noqa: E731
        try:
            if self.auto_micro:
                choice = fit.choose(compile_step, batch_size=cfg.batch_size, row_multiple=self.row_multiple,
                                    memory=self.memory, data_parallel=self.data_parallel)
            else:
                compiled = compile_step(self.num_micro)
                peak = fit.step_peak(compiled)
                choice = fit.Choice(self.num_micro, peak, compiled, {self.num_micro: peak}, fit.step_fixed(compiled))
        except fit.DoesNotFit as e:
            raise ConfigError(str(e), field="grad_accum_steps") from None
        self.fit_choice = choice
        if choice.num_micro != self.num_micro:
            self.num_micro, self.micro_rows = choice.num_micro, cfg.batch_size // choice.num_micro
            batches.resplit(self.num_micro)
        line = fit.describe(choice, batch_size=cfg.batch_size, data_parallel=self.data_parallel,
                            memory=self.memory, auto=self.auto_micro)
        if choice.peak > self.memory.usable:
            line += "; over the usable memory: config.grad_accum_steps='auto' chooses a count that fits"
        if jax.process_index() == 0:
            print(line, flush=True)
        compiled = choice.compiled
        self.train_step = lambda state, batch: compiled(state, batch, self.frozen_params)

    def _out_of_memory(self, step: int, run: "_RunState") -> OutOfMemory:
        """The one line for a step that ran out of device memory; the last checkpoint is left as it was."""
        cfg = self.config
        self.checkpointer.wait()
        good = (f"{self.checkpointer.root}/{run.last_saved}" if run.last_saved is not None
                else "none written yet")
        peak = self.fit_choice.peak
        n = fit.suggest(self.fit_choice, cfg.batch_size, self.row_multiple, self.memory.limit)
        fix = (f"rerun with --config.grad_accum_steps={n}" if n is not None else
               "rerun on more devices (config.mesh), with config.model.remat_policy='attention' or 'full', or a "
               "shorter config.seq_len")
        return OutOfMemory(f"out of device memory in step {step} with {self.num_micro} micro-batches: the compiled "
                           f"step needs {fit.gb(peak)} GB per device and the device has "
                           f"{fit.gb(self.memory.limit)} GB ({self.memory.source}); {fix} (it resumes from "
                           f"the last checkpoint, untouched: {good})")

    def lower_train_step(self, batch: dict, *, platform: str | None = None) -> jax.stages.Lowered:
        """The run set up (no data read, no state allocated) and its train step lowered for abstract inputs:
        batch {name: ShapeDtypeStruct [A, M, ...]} (global shapes; placed like real batches). Compile it for the
        per-device memory (`.compile().memory_analysis()`, benchmarks/memory_table.py) or read its HLO.
        `platform` ('cuda', 'tpu'): lower for that platform instead of this host's, the kernels traced for it
        (doge_jax.kernels.target), so what comes out is what a run there compiles (doge_jax.trainer.lowering)."""
        self._setup()
        self._compile_steps()
        state, batch, frozen = self._abstract_step_inputs(batch)
        if platform is None:
            with jax.set_mesh(self.mesh):
                return self.jitted_train_step.lower(state, batch, frozen)
        with target.lowering_for(platform), jax.set_mesh(self.mesh):
            return self.jitted_train_step.trace(state, batch, frozen).lower(lowering_platforms=(platform,))

    def _open_log(self, run: "_RunState") -> None:
        cfg = self.config
        self.is_main = jax.process_index() == 0
        self.log = metrics.RunLog(self.workdir, start_step=run.start, total_steps=cfg.total_steps,
                                  enabled=self.is_main, progress_bar=cfg.progress_bar, tensorboard=cfg.tensorboard)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.flops_per_token = flops.flops_per_token(self.model_cfg, cfg.seq_len)
        peak = flops.peak_flops(self.mesh.devices.flat[0], self.model_cfg.dtype, cfg.peak_tflops)
        self.peak_total = peak * self.mesh.devices.size if peak else None
        self.log.info(self._banner(run.start, self.tokens_per_step, self.flops_per_token))
        run.clock_time = time.perf_counter()

    def _step(self, state: dict, step: int, batches: ShardedBatches, run: "_RunState") -> tuple[dict, int]:
        """One optimizer step (profiling around it when asked); the previous step's metrics are logged while this
        one runs, so the host never waits on the device just to log."""
        profile = self.config.profile
        if profile.start_step >= 0 and step == profile.start_step and self.is_main:
            jax.profiler.start_trace(storage.join(self.workdir, "profile"))
        batch = next(batches)
        state, step_metrics = self.train_step(state, batch)
        step += 1
        if run.pending is not None:
            self._log(self._record(*run.pending, run), run)
        run.pending = (step, step_metrics)
        if profile.start_step >= 0 and step == profile.start_step + profile.num_steps and self.is_main:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.log.info(f"profile of steps {profile.start_step}..{step} in {self.workdir}/profile")
        return state, step

    def _record(self, step: int, step_metrics, run: "_RunState") -> dict:
        """Device metrics of `step` → host record; stops on a non-finite loss."""
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            self.checkpointer.wait()
            good = (f"{self.checkpointer.root}/{run.last_saved}" if run.last_saved is not None
                    else "none (no checkpoint was written yet)")
            raise TrainingDiverged(
                f"loss={values['loss']} grad_norm={values['grad_norm']} at step {step}: training stopped. "
                f"Last good checkpoint: {good}. Lower config.optimizer.lr or raise "
                "config.schedule.warmup_steps, then rerun (it resumes from that checkpoint).")
        elapsed = max(time.perf_counter() - run.clock_time - run.paused, 1e-9)
        tokens_per_sec = (step - run.clock_step) * self.tokens_per_step / elapsed
        values.pop(step_lib.WEIGHT, None)
        record = {"step": step, **values, "tokens_per_sec": tokens_per_sec,
                  "mfu": tokens_per_sec * self.flops_per_token / self.peak_total if self.peak_total else None,
                  "tokens": step * self.tokens_per_step}
        self.log.advance(step, values["loss"])
        return record

    def _log(self, record: dict, run: "_RunState", force: bool = False) -> None:
        cfg = self.config
        step = record["step"]
        if force or step % cfg.log_every == 0 or step == run.start + 1 or step == cfg.total_steps:
            self.log.write(record)
            run.clock_time, run.clock_step, run.paused = time.perf_counter(), step, 0.0
        run.last_record = record

    def _eval_and_checkpoint(self, state: dict, step: int, batches: ShardedBatches, run: "_RunState") -> None:
        """Eval every config.eval_every steps, checkpoints every checkpoint.every_steps, at the end and on stop;
        the time they take does not count against tokens/s."""
        cfg = self.config
        every = cfg.checkpoint.every_steps
        save_now = run.stopped or step == cfg.total_steps or (every > 0 and step % every == 0)
        eval_now = cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.total_steps)
        if not (save_now or eval_now):
            return
        record = self._record(*run.pending, run)
        run.pending = None
        t0 = time.perf_counter()
        if eval_now:
            record.update(self._evaluate(state["params"]))
            record.update(self._eval_tasks(state["params"], step))
        if save_now:
            self._checkpoint(state, step, batches, run)
        run.paused += time.perf_counter() - t0
        self._log(record, run, force=eval_now)

    def _checkpoint(self, state: dict, step: int, batches: ShardedBatches, run: "_RunState") -> None:
        self._saving = True  # a second SIGTERM / SIGINT now stops once this save is under way, not inside it
        try:
            self.checkpointer.save(step, state, self.model_cfg, self._train_meta(state, batches))
            run.last_saved = step
        finally:
            self._saving = False
        if self._stop_now:
            raise StoppedAtOnce(self.stop_signal)

    def _finish(self, step: int, stopped: bool) -> None:
        if self.is_main:
            png = metrics.plot_loss(self.workdir)
            where = f"{self.checkpointer.root}/{step}"
            print(f"{'stopped (signal)' if stopped else 'done'} at step {step}: checkpoint {where}"
                  + (f", loss curve {png}" if png else ""), flush=True)
        self.stopped = stopped

    def _banner(self, start: int, tokens_per_step: int, flops_per_token: float) -> str:
        cfg, m = self.config, self.model_cfg
        n_params = model_lib.count_params(m)
        mesh = " ".join(f"{a}={s}" for a, s in self.mesh.shape.items())
        ref = self.start_ref
        origin = {"resume": lambda: f"resuming {ref.root}/{ref.step}",
                  "init": lambda: f"params from {ref.root}/{ref.step}, fresh optimizer",
                  "scratch": lambda: f"from scratch (seed {cfg.seed})"}[self.start_kind]()
        return (f"Doge {n_params / 1e6:.2f}M params ({m.num_hidden_layers} layers, hidden {m.hidden_size}, "
                f"{m.dtype} compute) | {self.mesh.devices.size} {self.mesh.devices.flat[0].platform} devices "
                f"[{mesh}] x {jax.process_count()} process(es) | batch {cfg.batch_size} x {cfg.seq_len} "
                f"({tokens_per_step:,} tokens/step, {self.num_micro} micro-batches, {self.data_shards} data "
                f"shards) | {flops_per_token / 1e6:.1f} MFLOP/token | {origin} -> step {cfg.total_steps} | "
                f"{self.workdir}")


@dataclasses.dataclass
class _RunState:
    """What the loop's steps share: where the run started, the clock for tokens/s (time, step, time spent in
    eval and checkpoints since), the last step's metrics not yet read back, the last record and saved step."""

    start: int
    last_saved: int | None
    clock_time: float = 0.0
    clock_step: int = 0
    paused: float = 0.0
    pending: tuple | None = None
    last_record: dict = dataclasses.field(default_factory=dict)
    stopped: bool = False

    def __post_init__(self):
        self.clock_step = self.start


def _sds(tree, shardings):
    """Abstract arrays [shape, dtype] of `tree` with the matching `shardings` attached."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _traced_under_mesh(fn, mesh):
    """Calls (and so traces) `fn` under `jax.set_mesh(mesh)`: CDMoE (moe_impl="auto") then routes per token shard and runs its
    experts with the expert-parallel shard_map (doge_jax.parallel.experts) instead of gathering the tables."""

    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    return call
