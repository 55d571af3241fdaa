"""peft's IA3: (IA)^3, one `ia3_l` vector per adapted module, scaling its output or (feed-forward) its input.

peft scales a fused q/k/v projection whole, so a layer that scales only the key/value rows exports the
full (d_out, 1) vector with ones on the query rows.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from ...core import peft_convert, weights
from ...core.apply import get_state
from ...core.layer import AdapterLayer
from ..ia3 import IA3Config

PEFT_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save", "fan_in_fan_out",
               "init_ia3_weights", "layers_to_transform", "layers_pattern")
"""peft IA3Config fields peftkit reads."""


class IA3Converter(peft_convert.PeftConverter):
    """IA3Config <-> peft IA3Config."""

    peft_type = "IA3"
    config_cls = IA3Config
    tensors = {"ia3_l": "ia3_l"}

    def to_peft(self, cfg: IA3Config, model: nn.Module) -> dict[str, Any]:
        """peft's IA3Config fields for this adapter on `model`, with exact module names."""
        names = get_state(model).adapted
        layers = {n: get_state(model).layers[n] for n in names}
        feedforward = sorted(n for n, layer in layers.items() if layer.feedforward)
        return {
            **peft_convert.common_fields(model, cfg, self.peft_type),
            "target_modules": peft_convert.target_modules(model, names),
            # peft tests feedforward modules with a bare `endswith`: exact names, as a regex when that is ambiguous
            "feedforward_modules": (feedforward if not any(n.endswith(f) and n not in feedforward
                                                           for n in names for f in feedforward)
                                    else "|".join(re.escape(n) for n in feedforward)),
            "fan_in_fan_out": any(weights.layer_kind(layer.base) == "conv1d" for layer in layers.values()),
            "init_ia3_weights": True, "exclude_modules": None,
        }

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> IA3Config:
        """The config for a peft IA3Config dict (`model` is not needed: module names carry over as they are)."""
        cls = self.config_cls
        peft_convert.check_fields(data, cls, PEFT_FIELDS, {})
        ff = data.get("feedforward_modules") or []
        # peft: a regex string is fullmatched, a list entry matches as a plain suffix (no dot boundary)
        feedforward = ["re:" + ff] if isinstance(ff, str) else ["re:.*" + re.escape(f) for f in ff]
        return cls(targets=peft_convert.peft_targets(data.get("target_modules")),
                   exclude=peft_convert.peft_targets(data.get("exclude_modules")),
                   layers=peft_convert.peft_layers(data), modules_to_save=peft_convert.peft_saved_modules(data),
                   feedforward=feedforward)

    def export(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        """The whole (d_out, 1) or (1, d_in) vector, ones outside the rows a fused projection scales."""
        scale = layer.scale().to(layer.ia3_l.dtype).detach()
        return {"ia3_l": scale[None] if layer.feedforward else scale[:, None]}


IA3 = peft_convert.register_peft(IA3Converter())
