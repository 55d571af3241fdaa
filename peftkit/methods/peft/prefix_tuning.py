"""peft's PREFIX_TUNING: every layer's key/value prefixes as one (n, 2 L d_kv) `prompt_embeddings`.

peft itself saves only computed prefixes (its reparameterization MLP is not in the file either); they
are written with prefix_projection=False so that peft can also load them for further training, and a
peft file with prefix_projection=True loads as plain prefixes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...core import peft_convert
from ...core.config import ConfigError
from ...core.layer import AdapterLayer
from ..prefix_tuning import PrefixTuningConfig, kv_shape
from .prompt_tuning import PromptLearning


class PrefixTuningConverter(PromptLearning):
    """PrefixTuningConfig <-> peft PrefixTuningConfig (decoder self-attention caches)."""

    peft_type = "PREFIX_TUNING"
    config_cls = PrefixTuningConfig
    tensors = {"prefix": "prompt_embeddings"}

    def to_peft(self, cfg: PrefixTuningConfig, model: nn.Module) -> dict[str, Any]:
        """peft's PrefixTuningConfig for this adapter: the computed prefixes, without the MLP."""
        if not cfg.shift_positions:
            raise ConfigError("peft numbers the real tokens after the prefix; export needs shift_positions=True")
        common = self.common(cfg, model, "prefix tuning")
        layers, heads, head_dim = kv_shape(model)
        return {**common, "num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1,
                "token_dim": heads * head_dim, "num_attention_heads": heads, "num_layers": layers,
                "encoder_hidden_size": heads * head_dim, "prefix_projection": False, "init_weights": None}

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> PrefixTuningConfig:
        """The config for a peft PrefixTuningConfig dict, as plain prefixes."""
        cls = self.config_cls
        used = ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size",
                "prefix_projection", "init_weights", "modules_to_save")
        peft_convert.check_fields(data, cls, used, {"num_transformer_submodules": 1})
        if data.get("task_type") == "SEQ_2_SEQ_LM":
            raise ConfigError("peftkit's prefix tuning fills one self-attention cache; peft's SEQ_2_SEQ_LM prefixes "
                              "(encoder and decoder) are not supported")
        return cls(num_virtual_tokens=data.get("num_virtual_tokens"), init="random",
                   modules_to_save=peft_convert.peft_saved_modules(data))

    def export(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        return {"prefix": layer.prefix_states().detach().flatten(1)}  # peft's (n, 2 L d_kv) layout


PREFIX_TUNING = peft_convert.register_peft(PrefixTuningConverter())
