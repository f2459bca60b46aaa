"""Training: the mesh, AdamW + WSD, the one jitted train step, checkpoints, metrics and the Trainer.

    from doge_jax.trainer import Trainer
    Trainer(config, workdir).run()                                   # pretraining, as `python -m doge_jax.train`
    Trainer(config, workdir, loss_fn=my_loss, batch_source=my_batches, tokenizer=tok).run()   # SFT / DPO / ...

A loss function is `loss_fn(model, micro_batch, rng, **frozen) -> (loss, metrics)`, where `frozen` are the
models named by `Trainer(..., frozen={"reference": CKPT})` (arguments of the jitted step); see `step.py`.
`Trainer.lower_train_step(batch_shapes)` lowers the step without data or state (benchmarks/memory_table.py
compiles it for the per-device memory). A batch source is
`make(split=, shard_index=, shard_count=, rows=, num_batches=) -> iterator of dicts of numpy [rows, ...]`
with get_state()/set_state(); see `batches.py`.
"""

from doge_jax.trainer.loop import (INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, OutOfMemory, StoppedAtOnce, Trainer,
                                  TrainingDiverged, pretrain_source)
from doge_jax.trainer.mesh import initialize_distributed, make_mesh, mesh_shape
from doge_jax.trainer.optim import make_optimizer, wsd_schedule
from doge_jax.trainer.step import LossFn, make_eval_step, make_train_step, pretrain_loss
from doge_jax.trainer.validate import ConfigError

__all__ = ["Trainer", "TrainingDiverged", "OutOfMemory", "ConfigError", "PREEMPTED_EXIT_CODE", "INTERRUPTED_EXIT_CODE", "StoppedAtOnce", "LossFn", "pretrain_loss",
           "pretrain_source", "make_train_step", "make_eval_step", "make_optimizer", "wsd_schedule", "make_mesh",
           "mesh_shape", "initialize_distributed"]
