"""Converters between doge-jax checkpoints and transformers' native Doge format."""

from convert.api import from_hf, to_hf, upload

__all__ = ["from_hf", "to_hf", "upload"]
