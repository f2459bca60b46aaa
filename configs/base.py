"""Shared defaults for every run. Presets state only what differs (configs/doge_*.py)."""

import ml_collections


def model_defaults() -> ml_collections.ConfigDict:
    """Every field of doge_jax.DogeConfig with its default, read from the dataclass (doge_jax/model/config.py
    says what each does). A preset states what it changes; fields defaulting to None stay typed references so
    `--config.model.head_dim=64` parses as an int."""
    import dataclasses

    from doge_jax.model.config import DogeConfig

    fields = {}
    for f in dataclasses.fields(DogeConfig):
        if f.default is None:  # "int | None" → a typed None that the command line can set
            fields[f.name] = ml_collections.FieldReference(None, field_type=int)
        else:
            fields[f.name] = f.default
    return ml_collections.ConfigDict(fields)


def doge_architecture(m: ml_collections.ConfigDict, *, num_key_value_heads: int) -> None:
    """What every published Doge preset shares beyond DogeConfig's (transformers') defaults: tied embeddings,
    dynamic NTK RoPE with factor 4 over the 2048 training length, and GQA."""
    m.tie_word_embeddings = True
    m.rope_type = "dynamic"
    m.rope_factor = 4.0
    m.num_key_value_heads = num_key_value_heads


def get_config() -> ml_collections.ConfigDict:
    """Model + data + training fields. Every field can be overridden: `--config.optimizer.lr=3e-3`."""
    from doge_jax.data import data_config_defaults

    config = ml_collections.ConfigDict()
    config.model = model_defaults()
    # What a layer keeps for the backward pass: "auto" recomputes the XLA reference attention's [B, N, T, S]
    # probabilities (CPU, attention_impl='xla') and nothing where a kernel runs (doge_jax/model/options.py).
    config.model.remat_policy = "auto"
    config.data = data_config_defaults()

    config.seed = 0  # parameter init, dropout, data order (with data.seed)
    # The seed recipe trains at 2048 tokens per sequence; batch_size is global, in sequences.
    config.seq_len = 2048
    config.batch_size = 256
    # Micro-batches per step (a lax.scan accumulating gradients): "auto" = the fewest whose compiled step fits
    # the device's memory (doge_jax/trainer/fit.py: measured from the compiled step before step 1, said in one
    # line); an integer = exactly that many (batch_size must be divisible by it).
    config.grad_accum_steps = ml_collections.FieldReference("auto", field_type=object)  # or an int
    # The memory "auto" fits into, in GB per device; 0 = the device's own (accelerators: the allocator's
    # bytes_limit; a CPU host: available RAM / local devices), less the margin fit.py states.
    config.memory_limit_gb = 0.0
    # The loss runs the final norm, LM head and log-softmax over chunks of this many tokens, never holding the
    # [B, T, V] logits (doge_jax/model/token_scores.py); 0 = about 2^26 logits per chunk, -1 = all at once.
    config.loss_chunk_tokens = 0
    config.total_steps = 16_000
    # A checkpoint (workdir or step folder, e.g. from `convert from-hf`) to take the parameters from, with a
    # fresh optimizer at step 0 (fine-tuning). WORKDIR's own checkpoints always take precedence (resume).
    config.init_from = ""
    # A training checkpoint to continue from with everything (optimizer, step, data position) when WORKDIR is
    # new: branch a decay off a stable-phase checkpoint with total_steps = its step + schedule.decay_steps.
    config.resume_from = ""
    # Data streams the global batch is assembled from (0 = one per process). Fix it to reproduce a run's
    # batches on a different number of hosts.
    config.data_shards = 0

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=6e-3,  # peak LR (seed recipe: 8e-3 / 6e-3 / 4e-3 / 2e-3 for 20M / 60M / 160M / 320M)
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.01,  # matrices only: not norms, residual scales, biases or A
        clip_norm=1.0,  # global-norm clipping; 0 = off
    ))
    # Warmup-Stable-Decay (doge_jax/trainer/optim.py).
    config.schedule = ml_collections.ConfigDict(dict(
        warmup_steps=2000,
        decay_steps=-1,  # -1 = decay_fraction × total_steps
        decay_fraction=0.1,  # the seed recipe decays over the last 10 %
        min_lr_ratio=0.0,
        decay_type="linear",  # linear | cosine | 1-sqrt
    ))
    config.z_loss_coef = 0.0  # PaLM's logit z-loss (1e-4 is usual); MoE terms are in config.model

    # Mesh axis sizes; one may be -1 (fill). Batch over data·fsdp·expert, params over fsdp/tensor/expert.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    config.distributed = ml_collections.ConfigDict(dict(
        initialize="auto",  # auto: when a TPU pod / SLURM / MPI launcher is detected; always; never
        coordinator_address="",  # host:port of process 0, for clusters jax does not detect
        num_processes=0,
        process_id=-1,
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=1000,  # also on SIGTERM and at the end; 0 = only then
        keep=3,  # the last K checkpoints; 0 = all
        async_save=True,  # write while training continues
    ))
    config.log_every = 10
    config.eval_every = 1000  # eval loss / perplexity every N steps and at the end; 0 = never
    config.eval_batches = 16
    # lm-evaluation-harness tasks scored every eval_every steps (and at the end) on the training mesh, comma-
    # separated: "arc_easy,hellaswag", a group such as "doge_base", or "doge_offline" (no download). "" = none.
    config.eval_tasks = ""
    config.eval_tasks_limit = 200  # documents per task at each eval (0 = all of them)
    config.progress_bar = True
    config.tensorboard = True
    # CPU-only hosts: keep freed memory in the process instead of page-faulting every step's temporaries back
    # in (~25 % faster steps on 2 cores; doge_jax/trainer/hostmem.py).
    config.keep_freed_memory = True
    config.peak_tflops = 0.0  # per device, for MFU; 0 = by device kind (CPU: a measured GEMM rate)
    config.profile = ml_collections.ConfigDict(dict(
        start_step=-1,  # -1 = off; else a jax.profiler trace of num_steps steps into WORKDIR/profile
        num_steps=5,
    ))
    return config
