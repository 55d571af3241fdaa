"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022,
arXiv:2205.05638).

Learned vectors rescale activations, initialised to ones (identity at init):

* keys and values (output scaling):  k = l_k * (W_k x + b),  merged as W <- diag(l) W, b <- l * b;
* feed-forward (input scaling):     y = W_down (l_ff * h) + b,  merged as W <- W diag(l).

Trainable per block: d_k + d_v + d_ff. The parameter keeps peft's shape, (d_out, 1) for output
scaling and (1, d_in) for input scaling, so files map one to one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import peft_format, weights
from ..core.apply import get_state
from ..core.config import AdapterConfig, ConfigError
from ..core.inject import get_module, matches
from ..core.layer import AdapterLayer
from ..core.registry import register
from .lora import adapter_dtype

# Default targets cover common architectures (Llama, BERT, GPT-2); names a model lacks match nothing.
DEFAULT_TARGETS = ["k_proj", "v_proj", "down_proj", "key", "value", "output.dense", "c_attn", "mlp.c_proj"]
DEFAULT_FEEDFORWARD = ["down_proj", "output.dense", "mlp.c_proj"]


@dataclass
class IA3Config(AdapterConfig):
    """(IA)^3: learned rescaling vectors on keys, values and feed-forward inputs."""

    method = "ia3"
    paper: ClassVar[str] = "Liu et al. 2022, arXiv:2205.05638"
    trainable: ClassVar[str] = "d_out per scaled output, d_in per scaled input"

    targets: str | list[str] | None = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Modules to rescale (keys, values and feed-forward projections by default)."""

    feedforward: list[str] = field(default_factory=lambda: list(DEFAULT_FEEDFORWARD))
    """Targets scaled on their input rather than their output (the feed-forward down-projection)."""

    def validate(self) -> None:
        if isinstance(self.feedforward, str):
            self.feedforward = [self.feedforward]
        if self.targets is None:
            raise ConfigError("IA3Config needs targets (for example ['k_proj', 'v_proj', 'down_proj'])")

    # --- Hugging Face peft interop (key names live in core/peft_format.py) ---
    peft_type: ClassVar[str] = "IA3"

    def to_peft_config(self, model: nn.Module) -> dict:
        """peft's IA3Config fields for this adapter on `model`, with exact module names."""
        names = get_state(model).adapted
        layers = {n: get_module(model, n) for n in names}
        feedforward = sorted(n for n, layer in layers.items() if layer.feedforward)
        return {
            **peft_format.common_fields(model, self, self.peft_type),
            "target_modules": peft_format.target_modules(model, names),
            # peft tests feedforward modules with a bare `endswith`: exact names, as a regex when that is ambiguous
            "feedforward_modules": (feedforward if not any(n.endswith(f) and n not in feedforward
                                                           for n in names for f in feedforward)
                                    else "|".join(re.escape(n) for n in feedforward)),
            "fan_in_fan_out": any(weights.layer_kind(layer.base) == "conv1d" for layer in layers.values()),
            "init_ia3_weights": True, "exclude_modules": None,
        }

    @classmethod
    def from_peft_config(cls, data: dict, model: nn.Module | None = None) -> IA3Config:
        """The config for a peft IA3Config dict (`model` is not needed: module names carry over as they are)."""
        used = ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save", "fan_in_fan_out",
                "init_ia3_weights", "layers_to_transform", "layers_pattern")
        peft_format.check_fields(data, cls, used, {})
        ff = data.get("feedforward_modules") or []
        # peft: a regex string is fullmatched, a list entry matches as a plain suffix (no dot boundary)
        feedforward = ["re:" + ff] if isinstance(ff, str) else ["re:.*" + re.escape(f) for f in ff]
        return cls(targets=peft_format.peft_targets(data.get("target_modules")),
                   exclude=peft_format.peft_targets(data.get("exclude_modules")),
                   layers=peft_format.peft_layers(data), modules_to_save=peft_format.peft_saved_modules(data),
                   feedforward=feedforward)


class IA3Linear(AdapterLayer):
    """(IA)^3 on nn.Linear / GPT-2 Conv1D: `ia3_l` scales the output, or the input when feedforward."""

    peft_names = {"ia3_l": "ia3_l"}

    def __init__(self, base: nn.Module, feedforward: bool) -> None:
        super().__init__(base)
        d_in, d_out = weights.in_out_features(base)
        w = weights.get_weight(base)
        shape = (1, d_in) if feedforward else (d_out, 1)
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=adapter_dtype(w)))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.ia3_l)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base((x * scale).to(x.dtype), *args, **kwargs)
        y = self.base(x, *args, **kwargs)
        return (y * scale).to(y.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.ia3_l.to(weight.dtype)  # (d_out, 1) scales rows, (1, d_in) columns

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / (self.ia3_l.to(weight.dtype) + 1e-8)

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.feedforward else bias * self.ia3_l.flatten().to(bias.dtype)

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.feedforward else bias / (self.ia3_l.flatten().to(bias.dtype) + 1e-8)

    def extra_repr(self) -> str:
        return f"scales={'input' if self.feedforward else 'output'}"


@register(IA3Config)
def build(module: nn.Module, cfg: IA3Config, name: str) -> IA3Linear | None:
    """Wrap linear layers; feed-forward targets get input scaling."""
    if not weights.is_linear(module):
        return None
    return IA3Linear(module, feedforward=any(matches(name, p) for p in cfg.feedforward))
