"""peft's MISS with init_weights="bat": Bone, whose r x r blocks (d_out/r, r, r) are peft's `miss_block`."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ...core import peft_convert, weights
from ...core.apply import get_state
from ...core.config import ConfigError
from ..bone import BoneConfig

PEFT_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "r",
               "init_weights", "miss_dropout", "mini_r")
"""peft MissConfig fields peftkit reads; miss_dropout and mini_r do nothing in peft's "bat" forward, so any
value reads the same."""


class BoneConverter(peft_convert.PeftConverter):
    """BoneConfig <-> peft MissConfig(init_weights="bat")."""

    peft_type = "MISS"
    config_cls = BoneConfig
    tensors = {"bone_blocks": "miss_block"}

    def to_peft(self, cfg: BoneConfig, model: nn.Module) -> dict[str, Any]:
        """peft's MissConfig fields for this adapter on `model`, with exact module names."""
        names = get_state(model).adapted
        conv1d = [n for n in names if weights.layer_kind(get_state(model).layers[n]) != "linear"]
        if conv1d:
            raise ConfigError(f"peft's MiSS adapts nn.Linear only, not GPT-2 Conv1D "
                              f"({', '.join(conv1d[:3])}); save this adapter with format='peftkit' (the default)")
        return {
            **peft_convert.common_fields(model, cfg, self.peft_type),
            "target_modules": peft_convert.target_modules(model, names),
            "r": cfg.r, "init_weights": "bat", "miss_dropout": 0.0, "mini_r": 1, "bias": "none",
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        }

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> BoneConfig:
        """The config for a peft MissConfig dict written with init_weights="bat"."""
        cls = self.config_cls
        peft_convert.check_fields(data, cls, PEFT_FIELDS, {"bias": "none"})
        if data.get("init_weights", True) != "bat":
            raise ConfigError(f"peftkit reads peft's MiSS only with init_weights='bat' (Bone), got "
                              f"init_weights={data.get('init_weights', True)!r}; load this adapter with peft")
        return cls(targets=peft_convert.peft_targets(data.get("target_modules")),
                   exclude=peft_convert.peft_targets(data.get("exclude_modules")),
                   layers=peft_convert.peft_layers(data), modules_to_save=peft_convert.peft_saved_modules(data),
                   r=data.get("r", 64))


MISS = peft_convert.register_peft(BoneConverter())
