"""Training entry point: pretraining, and the post-training stages a config selects with `config.stage`.

    python -m doge_jax.train --config=configs/doge_60m.py                 # WORKDIR = runs/doge_60m
    python -m doge_jax.train --config=configs/doge_tiny.py --workdir=/tmp/run
    python -m doge_jax.train --config=configs/doge_60m.py --workdir=gs://bucket/doge60m \\
        --data=configs/data/smollm_corpus.py --config.mesh.fsdp=8 --config.model.dtype=bfloat16
    python -m doge_jax.train --config=configs/tiny_sft.py --workdir=/tmp/sft   # a config with config.stage

Every config field can be overridden as `--config.<path>=value`; `--data=FILE` replaces `config.data` with a
data preset (configs/data/), its fields overridden as `--data.<path>=value`. WORKDIR defaults to
`runs/<config file name>` under the current directory and may be a gs:// URL. Rerunning the same command
resumes from WORKDIR's latest checkpoint. Exit codes: 0 done, 2 bad config (one line naming the field; also when
the step cannot fit the device's memory, or ran out of it: the line names `--config.grad_accum_steps=N`), 3
diverged (non-finite loss), 143 stopped by SIGTERM and 130 by SIGINT (Ctrl-C): after the step in progress and a
checkpoint, or at once on a second signal (that step is lost, the last checkpoint stays; one line says which).
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/doge_tiny.py.",
                                          lock_config=True)
_DATA = config_flags.DEFINE_config_file("data", None, "A data preset replacing config.data, e.g. "
                                        "configs/data/smollm_corpus.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, tokenizer, metrics, "
                               "logs. Default: runs/<config file name>.")

DIVERGED_EXIT_CODE = 3
SLOW_STEP_SECONDS = 180.0  # on a host without an accelerator, a longer first step gets a one-line warning


def default_workdir(config_file: str) -> str:
    """runs/<config file stem>, relative to the current directory."""
    stem = os.path.splitext(os.path.basename(config_file.split(":", 1)[0]))[0]
    return os.path.join("runs", stem)


def cpu_step_estimate(config, gemm_flops: float) -> tuple[float, float]:
    """(seconds, FLOPs) of one training step at `gemm_flops` FLOP/s: a lower bound, since no step runs its
    matmuls faster than the best measured GEMM."""
    from doge_jax.trainer import flops, validate

    model_cfg = validate.model_config(config.model)
    step_flops = flops.flops_per_token(model_cfg, config.seq_len) * config.batch_size * config.seq_len
    return step_flops / gemm_flops, step_flops


def slow_cpu_warning(config, config_file: str, gemm_flops: float) -> str | None:
    """One line when a step would take more than SLOW_STEP_SECONDS here, naming the tiny preset."""
    seconds, step_flops = cpu_step_estimate(config, gemm_flops)
    if seconds <= SLOW_STEP_SECONDS:
        return None
    shown = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
    return (f"note: no accelerator here; one step of {config_file} ({config.batch_size} x {config.seq_len} tokens, "
            f"{step_flops:.2e} FLOPs) takes at least {shown} on this CPU (measured GEMM rate "
            f"{gemm_flops / 1e9:.0f} GFLOP/s); configs/doge_tiny.py trains in minutes here. Proceeding.")


def main(argv) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    config = _CONFIG.value
    if config is None:
        print("error: --config is required, e.g. --config=configs/doge_tiny.py", file=sys.stderr)
        return 2
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or default_workdir(config_file)
    print(f"workdir: {workdir}" + ("" if _WORKDIR.value else " (the default for this config; --workdir=DIR or "
                                   "gs://BUCKET/DIR to change)"), flush=True)
    if _DATA.value is not None:
        with config.unlocked():
            config.data = _DATA.value
    from doge_jax.trainer import hostmem

    accelerator = hostmem.has_accelerator()
    if config.keep_freed_memory and not accelerator:
        hostmem.keep_freed_memory()  # before XLA starts its threads; see hostmem.py
    from doge_jax.trainer import (INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, ConfigError, OutOfMemory,
                                  StoppedAtOnce, Trainer, TrainingDiverged, initialize_distributed)

    def stop_code(signum) -> int:
        return INTERRUPTED_EXIT_CODE if signum == signal.SIGINT else PREEMPTED_EXIT_CODE

    trainer = None

    try:
        initialize_distributed(config.distributed)
        if not accelerator:
            from doge_jax.trainer import flops

            warning = slow_cpu_warning(config, config_file, flops.peak_flops(override_tflops=config.peak_tflops))
            if warning:
                print(warning, flush=True)
        stage_kwargs = {}
        if config.get("stage", "pretrain") != "pretrain":  # SFT / DPO / GRPO: their loss, batches, tokenizer
            from doge_jax.posttrain import trainer_kwargs

            stage_kwargs = trainer_kwargs(config)
        trainer = Trainer(config, workdir, **stage_kwargs)
        trainer.run()
    except (ConfigError, OutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    except StoppedAtOnce as e:
        print(f"stopped: {e}", file=sys.stderr)
        # The step in flight cannot be cancelled, and a normal exit waits for it (doge_60m on a 2-core CPU: a step
        # of 42 minutes or more after "stopped at once"). Nothing is left to write: Trainer.run closed the
        # checkpointer, whose started saves have finished, and the run's log. So leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop_code(trainer.stop_signal))
    except KeyboardInterrupt:  # Ctrl-C before the training loop (setup, compiling): nothing of this run to save
        print("stopped: interrupted (Ctrl-C) before the first step; this run wrote no checkpoint", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return stop_code(trainer.stop_signal) if trainer.stopped else 0


def run() -> None:
    """The `doge-train` console script."""
    logging.set_verbosity(logging.WARNING)
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
