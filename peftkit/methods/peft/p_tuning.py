"""peft's P_TUNING: the file holds the encoder's output P = encoder(E) as `prompt_embeddings`, not the
encoder (as peft's own files do), so a peft P_TUNING file reads back as prompt tuning with that prompt."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...core import peft_convert
from ...core.apply import get_state
from ...core.config import ConfigError
from ...core.layer import AdapterLayer
from ..p_tuning import PTuningConfig
from ..prompt_tuning import PromptTuningConfig
from .prompt_tuning import PromptLearning


class PTuningConverter(PromptLearning):
    """PTuningConfig -> peft PromptEncoderConfig; back to PromptTuningConfig."""

    peft_type = "P_TUNING"
    config_cls = PTuningConfig
    tensors = {"prompt": "prompt_embeddings"}

    def to_peft(self, cfg: PTuningConfig, model: nn.Module) -> dict[str, Any]:
        """peft's PromptEncoderConfig fields for this adapter on `model`."""
        common = self.common(cfg, model, "P-tuning")
        config = getattr(model, "config", None)
        (layer_name,) = get_state(model).adapted
        width = get_state(model).layers[layer_name].inputs.shape[1]
        return {**common, "num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1,
                "token_dim": width, "num_attention_heads": getattr(config, "num_attention_heads", None),
                "num_layers": getattr(config, "num_hidden_layers", None),
                "encoder_reparameterization_type": cfg.encoder.upper(),
                "encoder_hidden_size": cfg.encoder_hidden or width, "encoder_num_layers": cfg.encoder_layers,
                "encoder_dropout": cfg.encoder_dropout}

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> PromptTuningConfig:
        """Prompt tuning with the file's prompt (the encoder is not in the file)."""
        used = ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "modules_to_save",
                "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout")
        peft_convert.check_fields(data, self.config_cls, used, {"num_transformer_submodules": 1})
        if data.get("task_type") == "SEQ_2_SEQ_LM":
            raise ConfigError("peftkit's P-tuning prepends to one input sequence; peft's SEQ_2_SEQ_LM P-tuning "
                              "is not supported")
        return PromptTuningConfig(num_virtual_tokens=data.get("num_virtual_tokens"), init="random",
                                  modules_to_save=peft_convert.peft_saved_modules(data))

    def export(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        return {"prompt": layer.soft_prompt().detach()}  # peft saves the encoder's output, not the encoder


P_TUNING = peft_convert.register_peft(PTuningConverter())
