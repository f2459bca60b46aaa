"""doge-jax: the Doge small language models in JAX / Flax NNX.

    import doge_jax
    model = doge_jax.load_model("runs/tiny")          # a training workdir or converted checkpoint
    logits = model(input_ids).logits                  # [B, T] int32 → [B, T, V]

Layout: `model/` (the model, bottom-up), `kernels/` (Pallas DMA kernels), `parallel/` (mesh rules, shard_map
code), `data/`, `trainer/`, `posttrain/`, `checkpoint.py`, `tokenizer.py`, `sampler.py`, `continuation.py`, and the
command-line tools in `cli/` (`python -m doge_jax.train` / `generate` are thin entry points to them).
"""

from doge_jax.checkpoint import load_model
from doge_jax.model.config import DogeConfig
from doge_jax.model.decoder import CausalLMOutput, Doge, build, count_params
from doge_jax.model.loss import causal_lm_loss, next_token_loss

__all__ = ["DogeConfig", "Doge", "CausalLMOutput", "build", "count_params", "load_model", "causal_lm_loss",
           "next_token_loss"]
