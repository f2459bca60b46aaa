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
    config = ml_collections.ConfigDict()
    config.model = model_defaults()
    return config
