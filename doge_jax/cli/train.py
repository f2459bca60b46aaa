"""Training entry point: pretraining, and the post-training stages a config selects with `config.stage`.

    python -m doge_jax.train --config=configs/doge_tiny.py --workdir=/tmp/run
    python -m doge_jax.train --config=configs/doge_60m.py --workdir=/shared/run \\
        --config.total_steps=16000 --config.mesh.fsdp=8 --config.model.dtype=bfloat16
    python -m doge_jax.train --config=configs/tiny_sft.py --workdir=/tmp/sft   # a config with config.stage

Every config field can be overridden as `--config.<path>=value`. Rerunning the same command resumes from
WORKDIR's latest checkpoint. Exit codes: 0 done, 2 bad config (one line naming the field), 3 diverged
(non-finite loss), 143 stopped by SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/doge_tiny.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tokenizer, metrics, logs.")

DIVERGED_EXIT_CODE = 3


def main(argv) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    config = _CONFIG.value
    if config is None:
        print("error: --config is required, e.g. --config=configs/doge_tiny.py", file=sys.stderr)
        return 2
    if not _WORKDIR.value:
        print("error: --workdir is required", file=sys.stderr)
        return 2
    from doge_jax.trainer import hostmem

    if config.keep_freed_memory and not hostmem.has_accelerator():
        hostmem.keep_freed_memory()  # before XLA starts its threads; see hostmem.py
    from doge_jax.trainer import ConfigError, PREEMPTED_EXIT_CODE, Trainer, TrainingDiverged, initialize_distributed

    try:
        initialize_distributed(config.distributed)
        stage_kwargs = {}
        if config.get("stage", "pretrain") != "pretrain":  # SFT / DPO / GRPO: their loss, batches, tokenizer
            from doge_jax.posttrain import trainer_kwargs

            stage_kwargs = trainer_kwargs(config)
        trainer = Trainer(config, _WORKDIR.value, **stage_kwargs)
        trainer.run()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    return PREEMPTED_EXIT_CODE if trainer.stopped else 0


def run() -> None:
    """The `doge-train` console script."""
    logging.set_verbosity(logging.WARNING)
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
