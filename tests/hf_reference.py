"""Tiny random transformers Doge models for parity tests (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DogeConfig, DogeForCausalLM

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, keep_window_size=64, tie_word_embeddings=False)


def make_hf_model(seed: int = 0, perturb: bool = True, **overrides) -> DogeForCausalLM:
    """A random DogeForCausalLM in fp32 eval mode. With `perturb`, `A`, the residual scales and the norm weights
    get random values so every parameter matters (A ≠ 0 also makes dt continuous: no top-k ties)."""
    torch.manual_seed(seed)
    cfg = DogeConfig(**{**TINY, **overrides})
    model = DogeForCausalLM(cfg).float().eval()
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".A"):
                    p.copy_(torch.randn(p.shape, generator=g))
                elif name.endswith(("residual", "norm.weight", "layernorm.weight")):
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
                elif name.endswith(".bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)


def torch_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.from_numpy(attention_mask.astype(np.int64))
        out = model(torch.from_numpy(ids.astype(np.int64)), **kwargs)
    return out.logits.float().numpy()
