"""peft's ADAPTION_PROMPT: LLaMA-Adapter's gated prompts, `adaption_prompt` (1, K, d) and `adaption_gate`.

peft adapts the top `adapter_layers` modules named `.<target_modules>`, so an adapter on other modules
(chosen by `layers` or `exclude`) has no peft equivalent.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ...core import peft_convert
from ...core.apply import get_state
from ...core.config import ConfigError
from ...core.inject import plain_modules
from ..llama_adapter import LlamaAdapterConfig


class AdaptionPromptConverter(peft_convert.PeftConverter):
    """LlamaAdapterConfig <-> peft AdaptionPromptConfig."""

    peft_type = "ADAPTION_PROMPT"
    config_cls = LlamaAdapterConfig
    tensors = {"adaption_prompt": "adaption_prompt", "adaption_gate": "adaption_gate"}

    def to_peft(self, cfg: LlamaAdapterConfig, model: nn.Module) -> dict[str, Any]:
        """peft's AdaptionPromptConfig fields; peft selects the top L modules named `.<target_modules>`."""
        common = peft_convert.common_fields(model, cfg, self.peft_type)
        if common.pop("modules_to_save"):
            raise ConfigError("peft's adaption prompt has no modules_to_save; save with format='peftkit'")
        adapted = get_state(model).adapted
        attribute = adapted[0].rsplit(".", 1)[-1]
        candidates = [n for n, _ in plain_modules(model) if n.endswith("." + attribute)]
        if candidates[-len(adapted):] != adapted:
            raise ConfigError(f"peft adapts the top {len(adapted)} modules named '{attribute}', not exactly "
                              f"{adapted}; drop `layers`/`exclude` or save with format='peftkit'")
        return {**common, "target_modules": attribute, "adapter_len": cfg.adapter_len,
                "adapter_layers": len(adapted)}

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> LlamaAdapterConfig:
        """The config for a peft AdaptionPromptConfig dict."""
        cls = self.config_cls
        peft_convert.check_fields(data, cls, ("target_modules", "adapter_len", "adapter_layers"), {})
        return cls(targets=data.get("target_modules") or "self_attn", adapter_len=data.get("adapter_len"),
                   adapter_layers=data.get("adapter_layers"))


ADAPTION_PROMPT = peft_convert.register_peft(AdaptionPromptConverter())
