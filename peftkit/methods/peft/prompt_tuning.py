"""peft's PROMPT_TUNING: the soft prompt (n, d), stored as `prompt_embeddings` with no module path.

The prompt learning types share that key (`PromptLearning.key`); peft wraps the transformers model one
level less deep for them, so modules_to_save go under `base_model.` (core/peft_format.py).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ...core import peft_convert
from ...core.apply import get_state
from ...core.config import ConfigError
from ...core.layer import AdapterLayer
from ..prompt_tuning import PromptTuningConfig


class PromptLearning(peft_convert.PeftConverter):
    """What peft's prompt learning types share: one `prompt_embeddings` tensor and a required task type."""

    def key(self, layer: AdapterLayer, module_name: str, local: str) -> str:
        return "prompt_embeddings"  # peft stores prompt learning weights without a module path

    def common(self, cfg: Any, model: nn.Module, what: str) -> dict[str, Any]:
        """`common_fields`, refusing a model whose task type peftkit cannot tell (peft picks its class by it)."""
        common = peft_convert.common_fields(model, cfg, self.peft_type)
        if common["task_type"] is None:
            raise ConfigError(f"peft's {what} needs a task type, and peftkit cannot tell it from "
                              f"{type(model).__name__}; supported: model classes ending in "
                              f"{', '.join(peft_convert.TASK_TYPES)}")
        return common


class PromptTuningConverter(PromptLearning):
    """PromptTuningConfig <-> peft PromptTuningConfig (decoder-only and encoder-only models)."""

    peft_type = "PROMPT_TUNING"
    config_cls = PromptTuningConfig
    tensors = {"prompt": "prompt_embeddings"}

    def to_peft(self, cfg: PromptTuningConfig, model: nn.Module) -> dict[str, Any]:
        """peft's PromptTuningConfig fields for this adapter on `model`.

        The init is written as SAMPLE_VOCAB or RANDOM (a TEXT init would make peft download the tokenizer
        at load time only to overwrite the result with the saved prompt).
        """
        common = self.common(cfg, model, "prompt tuning")
        config = getattr(model, "config", None)
        (layer_name,) = get_state(model).adapted
        return {
            **common, "num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1,
            "token_dim": get_state(model).layers[layer_name].prompt.shape[1],
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_layers": getattr(config, "num_hidden_layers", None),
            "prompt_tuning_init": "SAMPLE_VOCAB" if cfg.init == "vocab" else "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        }

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> PromptTuningConfig:
        """The config for a peft PromptTuningConfig dict."""
        cls = self.config_cls
        used = ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "prompt_tuning_init",
                "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs", "modules_to_save")
        peft_convert.check_fields(data, cls, used, {"num_transformer_submodules": 1})
        if data.get("task_type") == "SEQ_2_SEQ_LM":
            raise ConfigError("peftkit's prompt tuning prepends to one input sequence; peft's SEQ_2_SEQ_LM "
                              "prompt tuning (encoder and decoder prompts) is not supported")
        init = {"TEXT": "text", "SAMPLE_VOCAB": "vocab"}.get(data.get("prompt_tuning_init"), "random")
        text, tokenizer = data.get("prompt_tuning_init_text") or "", data.get("tokenizer_name_or_path") or ""
        if init == "text" and not (text and tokenizer):
            init = "random"  # the weights come from the file; the init only matters for training from scratch
        return cls(num_virtual_tokens=data.get("num_virtual_tokens"), init=init, init_text=text, tokenizer=tokenizer,
                   modules_to_save=peft_convert.peft_saved_modules(data))


PROMPT_TUNING = peft_convert.register_peft(PromptTuningConverter())
