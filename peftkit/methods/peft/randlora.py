"""peft's RANDLORA: the trained diagonals `randlora_lambda`, `randlora_gamma`; the shared random bases are
re-created from the seed (projection_prng_key), never loaded.

peft files saved with save_projection=True carry the bases, model-wide (`base_model.randlora_A`) and
repeated under every layer (`<module>.randlora_A`): on load they must equal the regenerated ones
(checked, then dropped). The export writes them once, at the model-wide keys, so peft never redraws them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...core import peft_convert, weights
from ...core.apply import get_state
from ...core.layer import AdapterLayer
from ..randlora import RandLoRAConfig

PEFT_FIELDS = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "r", "randlora_alpha",
               "randlora_dropout", "projection_prng_key", "save_projection", "sparse", "very_sparse",
               "fan_in_fan_out", "init_weights")
"""peft RandLoraConfig fields peftkit reads; fan_in_fan_out is implied by GPT-2 Conv1D, save_projection only
says whether the file carries the bases (checked when present), init_weights only changes a fresh init."""

SHARED_PEFT_KEYS = {"basis_A": "base_model.randlora_A", "basis_B": "base_model.randlora_B"}
"""peft's keys of the model-wide bases (it also repeats them under every layer: `<module>.randlora_A`)."""


class RandLoRAConverter(peft_convert.PeftConverter):
    """RandLoRAConfig <-> peft RandLoraConfig."""

    peft_type = "RANDLORA"
    config_cls = RandLoRAConfig
    tensors = {"randlora_lambda": "randlora_lambda", "randlora_gamma": "randlora_gamma"}

    def to_peft(self, cfg: RandLoRAConfig, model: nn.Module) -> dict[str, Any]:
        """peft's RandLoraConfig fields for this adapter on `model`, with exact module names."""
        names = get_state(model).adapted
        kinds = {weights.layer_kind(get_state(model).layers[n]) for n in names}
        return {
            **peft_convert.common_fields(model, cfg, self.peft_type),
            "target_modules": peft_convert.target_modules(model, names),
            "r": cfg.r, "randlora_alpha": cfg.alpha, "randlora_dropout": cfg.dropout,
            "projection_prng_key": cfg.seed, "save_projection": True,
            "sparse": cfg.bases == "sparse", "very_sparse": cfg.bases == "very_sparse",
            "fan_in_fan_out": "conv1d" in kinds, "bias": "none", "init_weights": True,
            "layers_to_transform": None, "layers_pattern": None,
        }

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> RandLoRAConfig:
        """The config for a peft RandLoraConfig dict (peft's very_sparse wins over sparse, as in peft)."""
        cls = self.config_cls
        peft_convert.check_fields(data, cls, PEFT_FIELDS, {"bias": "none"})
        bases = "very_sparse" if data.get("very_sparse") else "sparse" if data.get("sparse") else "dense"
        return cls(targets=peft_convert.peft_targets(data.get("target_modules")),
                   layers=peft_convert.peft_layers(data), modules_to_save=peft_convert.peft_saved_modules(data),
                   r=data.get("r", 32), alpha=data.get("randlora_alpha", 640),
                   dropout=data.get("randlora_dropout", 0.0), seed=data.get("projection_prng_key", 0), bases=bases)

    def export(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        a, b = layer.bases.tensors()
        return {**super().export(layer), "basis_A": a, "basis_B": b}

    def key(self, layer: AdapterLayer, module_name: str, local: str) -> str:
        return SHARED_PEFT_KEYS.get(local) or super().key(layer, module_name, local)

    def recreated(self, layer: AdapterLayer, module_name: str) -> dict[str, torch.Tensor]:
        a, b = layer.bases.tensors()
        prefix = f"base_model.model.{module_name}."
        return {prefix + "randlora_A": a, prefix + "randlora_B": b,
                SHARED_PEFT_KEYS["basis_A"]: a, SHARED_PEFT_KEYS["basis_B"]: b}


RANDLORA = peft_convert.register_peft(RandLoRAConverter())
