"""The first published SmallDoge layout's config (Doge-60M/160M/320M and their -Instruct models), for transformers 5.

Shipped as remote code inside every folder `python -m convert to-hf` writes for that layout and registered through
`auto_map` in its config.json; it imports only transformers. It is transformers 5's own `DogeConfig` plus
`dynamic_mask_ratio`, a field those checkpoints' config.json files carry and the native config has no name for:
SmallDoge's original code masked that fraction of the keys beyond `keep_window_size` with a `kthvalue`
threshold. Every published model uses the default 0.0 (no such masking), the only value this modeling file
implements; anything else is refused at load time rather than computed differently.

Other keys of the published files pass through as attributes, as transformers does for any config: `hidden_bias`
(the original single bias switch; the exporter writes `attention_bias` / `mlp_bias` next to it), and old
`rope_theta` + `rope_scaling` (with `"type"` or `"rope_type"`), standardised by transformers as for native Doge.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.doge.configuration_doge import DogeConfig


@strict
class DogeLegacyConfig(DogeConfig):
    # model_type stays "doge", as in the published config.json files. A class of its own keeps transformers'
    # auto mapping for native Doge untouched when both kinds load in one process.
    dynamic_mask_ratio: float = 0.0

    def __post_init__(self, **kwargs):
        if self.dynamic_mask_ratio != 0.0:
            raise ValueError(f"dynamic_mask_ratio={self.dynamic_mask_ratio} is not supported: the first-layout "
                             f"Doge modeling file implements 0.0 only, the default every published model uses")
        super().__post_init__(**kwargs)


__all__ = ["DogeLegacyConfig"]
