"""peft's LORA: LoRA, and DoRA as its variant `use_dora=True`.

PiSSA/OLoRA keep their initial factors A0, B0 and a base that holds W0 - s B0 A0; peft's own files
of those inits are converted to a plain LoRA of the original base, and so is the export here: a rank-2r
LoRA with the same scaling (alpha times 2, sqrt(2) with rslora),

    W0 + s [B, -B0] [A; A0] = (W0 - s B0 A0) + s B A,

as peft does with `path_initial_model_for_weight_conversion`. A peft file written with
init_lora_weights="pissa"/"olora" (not converted) holds A, B only: A0, B0 are re-derived on load by
running the init on the original base (core/peft_format.py, `_derive`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn as nn

from ...core import peft_convert, weights
from ...core.apply import get_state
from ...core.config import ConfigError
from ...core.layer import AdapterLayer
from ..dora import DoRAConfig
from ..lora import INITS, LoRAConfig, LoRAEmbedding

PEFT_INITS = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
"""peft's init_lora_weights -> LoRAConfig.init (PiSSA with randomized SVD, "pissa_niter_k", is not exact)."""

PEFT_LORA_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
                    "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "rank_pattern",
                    "alpha_pattern", "fan_in_fan_out", "megatron_core", "qalora_group_size")
"""peft LoraConfig fields peftkit reads; fan_in_fan_out is implied by GPT-2 Conv1D (peft corrects it per layer
as well), megatron_core and qalora_group_size matter only with their inert switches."""

PEFT_LORA_INERT = {"bias": "none", "lora_bias": False, "use_qalora": False, "layer_replication": None,
                   "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
                   "megatron_config": None, "trainable_token_indices": None, "target_parameters": None,
                   "alora_invocation_tokens": None, "arrow_config": None, "kasa_config": None,
                   "monteclora_config": None, "velora_config": None, "use_bdlora": None,
                   "ensure_weight_tying": False}
"""peft LoraConfig fields peftkit accepts only at their default (shown): they change the model otherwise."""


class LoRAConverter(peft_convert.PeftConverter):
    """LoRAConfig <-> peft LoraConfig; linear, Conv1D and conv layers as `lora_A.weight`, embeddings as
    `lora_embedding_A`."""

    peft_type = "LORA"
    config_cls = LoRAConfig
    tensors = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    embedding_tensors = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

    def to_peft(self, cfg: LoRAConfig, model: nn.Module) -> dict[str, Any]:
        """peft's LoraConfig fields for this adapter on `model`, with exact module names (PiSSA/OLoRA: rank 2r,
        see the module docstring)."""
        names = get_state(model).adapted
        fold = INITS[cfg.init].changes_base
        r_factor, a_factor = (2, math.sqrt(2) if cfg.rslora else 2) if fold else (1, 1)
        kinds = {weights.layer_kind(get_state(model).layers[n]) for n in names}
        return {
            **peft_convert.common_fields(model, cfg, self.peft_type),
            "target_modules": peft_convert.target_modules(model, names),
            "r": cfg.r * r_factor, "lora_alpha": cfg.alpha * a_factor,
            "rank_pattern": peft_convert.pattern_dict({n: cfg.rank_for(n) * r_factor for n in names}, cfg.r * r_factor),
            "alpha_pattern": peft_convert.pattern_dict({n: cfg.alpha_for(n) * a_factor for n in names},
                                                      cfg.alpha * a_factor),
            "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
            "use_dora": self.variant.get("use_dora", False),
            "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
            "fan_in_fan_out": "conv1d" in kinds, "bias": "none", "lora_bias": False,
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        }

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> LoRAConfig:
        """The config for a peft LoraConfig dict (`model` is not needed: module names carry over as they are)."""
        cls = self.config_cls
        peft_convert.check_fields(data, cls, PEFT_LORA_FIELDS, PEFT_LORA_INERT)
        init = data.get("init_lora_weights", True)
        if init not in PEFT_INITS:
            raise ConfigError(
                f"peftkit cannot load a peft LoRA with init_lora_weights={init!r} (supported: True, False, "
                "'gaussian', 'pissa', 'olora'); if that init changed the base weights, convert the adapter to a "
                "plain LoRA in peft: save_pretrained(..., path_initial_model_for_weight_conversion=...)")
        return cls(targets=peft_convert.peft_targets(data.get("target_modules")),
                   exclude=peft_convert.peft_targets(data.get("exclude_modules")),
                   layers=peft_convert.peft_layers(data), modules_to_save=peft_convert.peft_saved_modules(data),
                   r=data.get("r", 8), alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                   rslora=bool(data.get("use_rslora", False)), init=PEFT_INITS[init],
                   rank_pattern=_peft_patterns(data.get("rank_pattern")),
                   alpha_pattern=_peft_patterns(data.get("alpha_pattern")))

    def names(self, layer: AdapterLayer) -> dict[str, str]:
        return self.embedding_tensors if isinstance(layer, LoRAEmbedding) else self.tensors

    def values_without_model(self, data: dict[str, Any], tensors: dict[str, torch.Tensor]
                             ) -> dict[str, torch.Tensor] | None:
        """A plain LoRA names its factors by key alone (`<module>.lora_A.weight`, `<module>.lora_embedding_A`);
        DoRA, PiSSA/OLoRA and files with other tensors (modules_to_save, a trained bias) need the model."""
        if self.variant or str(data.get("init_lora_weights")).lower() in ("pissa", "olora"):
            return None
        suffixes = {peft: local for table in (self.tensors, self.embedding_tensors) for local, peft in table.items()}
        out = {}
        for key, value in tensors.items():
            suffix = next((s for s in suffixes if key.endswith("." + s)), None)
            if suffix is None:
                return None
            out[key[: -len(suffix) - 1] + "." + suffixes[suffix]] = value
        return out

    def export(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        """PiSSA/OLoRA fold into a rank-2r LoRA of the original base (module docstring)."""
        state = super().export(layer)
        if hasattr(layer, "lora_A0"):  # linear layers only: A (r, d_in), B (d_out, r)
            state["lora_A"] = torch.cat([layer.lora_A, layer.lora_A0]).detach()
            state["lora_B"] = torch.cat([layer.lora_B, -layer.lora_B0], dim=1).detach()
        return state


class DoRAConverter(LoRAConverter):
    """DoRAConfig <-> peft LoraConfig with use_dora=True; the magnitude is `lora_magnitude_vector`."""

    variant = {"use_dora": True}
    config_cls = DoRAConfig
    tensors = {**LoRAConverter.tensors, "magnitude": "lora_magnitude_vector"}


def _peft_patterns(patterns: dict | None) -> dict:
    """peft's rank/alpha_pattern keys match `(.*\\.)?(key)$` as a regex; a plain word ("q_proj") means the
    same in peftkit's syntax, anything else is carried over as that regex."""
    return {k if re.fullmatch(r"\w+", k) else f"re:(.*\\.)?({k})": v for k, v in (patterns or {}).items()}


LORA = peft_convert.register_peft(LoRAConverter())
DORA = peft_convert.register_peft(DoRAConverter())
