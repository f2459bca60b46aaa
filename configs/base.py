"""Shared defaults for every run. Presets state only what differs (configs/doge_*.py)."""

import ml_collections


def model_defaults() -> ml_collections.ConfigDict:
    """Fields of doge_jax.DogeConfig; see doge_jax/config.py for what each does."""
    return ml_collections.ConfigDict(dict(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=32,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=ml_collections.FieldReference(None, field_type=int),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        # The Doge presets extend context with dynamic NTK, factor 4 over the 2048 training length.
        rope_type="dynamic",
        rope_factor=4.0,
        attention_bias=False,
        mlp_bias=False,
        sliding_window=ml_collections.FieldReference(None, field_type=int),
        keep_window_size=2048,
        is_moe=False,
        num_experts=16384,
        num_experts_per_tok=64,
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
        pad_token_id=ml_collections.FieldReference(None, field_type=int),
        bos_token_id=ml_collections.FieldReference(None, field_type=int),
        eos_token_id=ml_collections.FieldReference(None, field_type=int),
        qk_norm=True,
        dt_heads="kv",
        router_layout="per_token",
        router_z_loss_coef=0.0,
        attention_impl="xla",
        dtype="float32",
        remat_policy="none",
    ))


def get_config() -> ml_collections.ConfigDict:
    """Model + data + training fields. Every field can be overridden: `--config.optimizer.lr=3e-3`."""
    from doge_jax.data import data_config_defaults

    config = ml_collections.ConfigDict()
    config.model = model_defaults()
    config.data = data_config_defaults()

    config.seed = 0  # parameter init, dropout, data order (with data.seed)
    # The seed recipe trains at 2048 tokens per sequence; batch_size is global, in sequences.
    config.seq_len = 2048
    config.batch_size = 256
    config.grad_accum_steps = 1  # micro-batches per step (lax.scan); batch_size must be divisible by it
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
