"""doge-jax: the Doge small language models in JAX / Flax NNX.

    import doge_jax
    model = doge_jax.load_model("runs/tiny")          # a training workdir or converted checkpoint
    logits = model(input_ids).logits                  # [B, T] int32 → [B, T, V]
"""

from doge_jax.checkpoint import load_model
from doge_jax.config import DogeConfig
from doge_jax.loss import causal_lm_loss, next_token_loss
from doge_jax.model import CausalLMOutput, Doge, build, count_params

__all__ = ["DogeConfig", "Doge", "CausalLMOutput", "build", "count_params", "load_model", "causal_lm_loss",
           "next_token_loss"]
