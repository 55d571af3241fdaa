"""peft's LOKR with whole w1, w2: DiffuseKronA, whose factors A, B are peft's `lokr_w1`, `lokr_w2`.

peft picks the factor shapes with `factorization(dim, decompose_factor)` (kronecker.factor_pair) and keeps
w2 whole when r >= max(b1, b2) / 2; it scales by alpha / r, so alpha_peft = alpha * r.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ...core import peft_convert, weights
from ...core.apply import get_state
from ...core.config import ConfigError
from ..kronecker import DiffuseKronAConfig, KroneckerLinear, factor_pair

PEFT_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
               "r", "alpha", "decompose_factor", "init_weights")
"""peft LoKrConfig fields peftkit reads (init_weights only changes a fresh init)."""

PEFT_INERT = {"rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False, "decompose_both": False,
              "use_effective_conv2d": False, "rank_pattern": {}, "alpha_pattern": {}}
"""peft LoKrConfig fields peftkit accepts only at their default (shown)."""


class LoKrConverter(peft_convert.PeftConverter):
    """DiffuseKronAConfig <-> peft LoKrConfig (undecomposed w1, w2)."""

    peft_type = "LOKR"
    config_cls = DiffuseKronAConfig
    tensors = {"kron_A": "lokr_w1", "kron_B": "lokr_w2"}

    def to_peft(self, cfg: DiffuseKronAConfig, model: nn.Module) -> dict[str, Any]:
        """peft's LoKrConfig for this adapter: a decompose_factor that gives every layer's shapes, an r at
        which peft keeps w2 whole (r >= max(b1, b2) / 2) and alpha_peft = alpha * r (peft scales by alpha / r)."""
        names = get_state(model).adapted
        layers = [get_state(model).layers[n] for n in names]
        if any(weights.layer_kind(layer.base) != "linear" for layer in layers):
            raise ConfigError("peft's LoKr adapts nn.Linear but not GPT-2 Conv1D layers; save this adapter with "
                              "format='peftkit'")
        factor = _peft_factor(cfg, layers)
        r = max(max(-(-max(layer.kron_B.shape) // 2), 1) for layer in layers)
        return {
            **peft_convert.common_fields(model, cfg, self.peft_type),
            "target_modules": peft_convert.target_modules(model, names), "exclude_modules": None,
            "r": r, "alpha": cfg.alpha * r, "decompose_factor": factor, "decompose_both": False,
            "rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False, "use_effective_conv2d": False,
            "init_weights": True, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None,
        }

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> DiffuseKronAConfig:
        """The config for a peft LoKrConfig dict whose w1, w2 are whole (the factor shapes follow decompose_factor)."""
        cls = self.config_cls
        peft_convert.check_fields(data, cls, PEFT_FIELDS, PEFT_INERT)
        return cls(targets=peft_convert.peft_targets(data.get("target_modules")),
                   exclude=peft_convert.peft_targets(data.get("exclude_modules")),
                   layers=peft_convert.peft_layers(data), modules_to_save=peft_convert.peft_saved_modules(data),
                   factor=data.get("decompose_factor", -1), alpha=data.get("alpha", 8) / data.get("r", 8))


def _peft_factor(cfg: DiffuseKronAConfig, layers: list[KroneckerLinear]) -> int:
    """A peft decompose_factor under which `factorization` gives every layer's (a1, a2)."""
    candidates = [cfg.factor] + ([cfg.a1] if cfg.a1 is not None and cfg.a1 == cfg.a2 else [])
    for factor in candidates:
        if all(factor_pair(layer.d_out, factor)[0] == layer.kron_A.shape[0]
               and factor_pair(layer.d_in, factor)[0] == layer.kron_A.shape[1] for layer in layers):
            return factor
    raise ConfigError(f"no single peft decompose_factor gives these factor shapes (a1={cfg.a1}, a2={cfg.a2}); peft's "
                      "LoKr can express a1 == a2, or shapes picked by `factor`. Save with format='peftkit'")


LOKR = peft_convert.register_peft(LoKrConverter())
