"""peft's ADALORA: AdaLoRA, whose pruned triplets are dropped on export and written as peft's rank_pattern.

peft resizes each module to its kept triplets when it saves, and `rank_pattern` ({"<module>.lora_E":
init_r flags}) says which ones those are; a peft file with a rank_pattern loads into layers of the kept
size (`AdaLoRAConfig.rank_pattern`), with the scale of init_r, exactly as peft does.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from ...core import peft_convert, weights
from ...core.apply import get_state
from ...core.layer import AdapterLayer
from ..adalora import AdaLoRAConfig, AdaLoRALinear
from .lora import PEFT_LORA_INERT

PEFT_ADALORA_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                       "modules_to_save", "r", "lora_alpha", "lora_dropout", "init_r", "target_r", "tinit", "tfinal",
                       "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step", "rank_pattern", "alpha_pattern",
                       "use_rslora", "use_dora", "init_lora_weights", "fan_in_fan_out", "megatron_core",
                       "qalora_group_size")
"""peft AdaLoraConfig fields peftkit reads. peft's AdaLoRA layers ignore r, alpha_pattern and use_rslora
(its scale is lora_alpha / init_r) and refuse use_dora; init_lora_weights only matters before training."""


class AdaLoRAConverter(peft_convert.PeftConverter):
    """AdaLoRAConfig <-> peft AdaLoraConfig; P, lambda, Q are `lora_A`, `lora_E`, `lora_B`."""

    peft_type = "ADALORA"
    config_cls = AdaLoRAConfig
    tensors = {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}

    def to_peft(self, cfg: AdaLoRAConfig, model: nn.Module) -> dict[str, Any]:
        """peft's AdaLoraConfig fields for this adapter on `model`, with the kept triplets as rank_pattern."""
        names = get_state(model).adapted
        layers = {n: get_state(model).layers[n] for n in names}
        pattern = {f"{n}.lora_E": rank_pattern(layer) for n, layer in layers.items()}
        pruned = any(not all(flags) for flags in pattern.values())
        kinds = {weights.layer_kind(layer.base) for layer in layers.values()}
        return {
            **peft_convert.common_fields(model, cfg, self.peft_type),
            "target_modules": peft_convert.target_modules(model, names),
            "init_r": cfg.init_r, "target_r": cfg.target_r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "tinit": cfg.tinit, "tfinal": cfg.tfinal, "deltaT": cfg.delta_t, "beta1": cfg.beta1,
            "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight,
            # peft requires total_step > tinit + tfinal; it matters only to training
            "total_step": cfg.total_steps or cfg.tinit + cfg.tfinal + 1,
            "rank_pattern": pattern if pruned else None, "fan_in_fan_out": "conv1d" in kinds,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "bias": "none",
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        }

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> AdaLoRAConfig:
        """The config for a peft AdaLoraConfig dict (module names carry over as they are)."""
        cls = self.config_cls
        peft_convert.check_fields(data, cls, PEFT_ADALORA_FIELDS, PEFT_LORA_INERT)
        alpha = data.get("lora_alpha", 8)
        init_r = data.get("init_r", 12)
        pattern = {re.sub(r"\.lora_E(\.[^.]+)?$", "", k): [bool(f) for f in v]
                   for k, v in (data.get("rank_pattern") or {}).items()}
        return cls(targets=peft_convert.peft_targets(data.get("target_modules")),
                   exclude=peft_convert.peft_targets(data.get("exclude_modules")),
                   layers=peft_convert.peft_layers(data), modules_to_save=peft_convert.peft_saved_modules(data),
                   init_r=init_r, target_r=min(data.get("target_r", 8), init_r),
                   alpha=alpha if alpha > 0 else float(init_r),  # peft: scaling = lora_alpha or r
                   dropout=data.get("lora_dropout", 0.0), tinit=data.get("tinit", 0), tfinal=data.get("tfinal", 0),
                   delta_t=data.get("deltaT", 1), beta1=data.get("beta1", 0.85), beta2=data.get("beta2", 0.85),
                   orth_reg_weight=data.get("orth_reg_weight", 0.5), total_steps=data.get("total_step"),
                   rank_pattern=pattern)

    def export(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        """Only the kept triplets, as peft resizes them on save (a dropped triplet has lambda = 0: exact)."""
        keep = layer.kept()
        return {"lora_A": layer.lora_A[keep].detach(), "lora_E": layer.lora_E[keep].detach(),
                "lora_B": layer.lora_B[:, keep].detach()}


def rank_pattern(layer: AdaLoRALinear) -> list[bool]:
    """peft's rank_pattern entry of a layer: init_r flags, True for each triplet it exports."""
    flags, kept = [False] * len(layer.held), iter(layer.kept().tolist())
    for i, held in enumerate(layer.held):
        flags[i] = held and next(kept)
    return flags


ADALORA = peft_convert.register_peft(AdaLoRAConverter())
