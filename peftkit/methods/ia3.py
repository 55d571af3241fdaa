"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022,
arXiv:2205.05638).

Learned vectors rescale activations, initialised to ones (identity at init):

* keys and values (output scaling):  k = l_k * (W_k x + b),  merged as W <- diag(l) W, b <- l * b;
* feed-forward (input scaling):     y = W_down (l_ff * h) + b,  merged as W <- W diag(l).

Trainable per block: d_k + d_v + d_ff. The parameter keeps peft's shape, (d_out, 1) for output
scaling and (1, d_in) for input scaling, so files map one to one.

Default targets are roles (`core.architectures`): the key and value projections and the MLP down
projection (input-scaled), on any architecture the role table or its name fallback knows. A fused
q/k/v projection (GPT-2 `c_attn`, GPT-NeoX/BLOOM/Falcon `query_key_value`, Phi-3 `qkv_proj`) selected
through the key/value roles gets a vector over its key and value rows only, laid out as the family
interleaves them (per head for GPT-NeoX, q | k | v for Phi-3 with its key/value head count ...): the
queries stay unscaled, as in the paper. Named explicitly (`targets=["c_attn"]`), a fused projection
is scaled whole, as Hugging Face peft does; a peft export of a key/value-only vector writes the full
(d_out, 1) vector with ones on the query rows, which is the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import architectures, weights
from ..core.config import AdapterConfig, ConfigError
from ..core.inject import matches
from ..core.layer import AdapterLayer
from ..core.model_adapter import ModelAdapter
from ..core.registry import register, register_model_adapter
from .lora import adapter_dtype

# Roles resolved per architecture (core/architectures.py): keys, values, and the feed-forward down projection.
DEFAULT_TARGETS = ["role:key", "role:value", "role:mlp-down"]
DEFAULT_FEEDFORWARD = ["role:mlp-down"]


@dataclass
class IA3Config(AdapterConfig):
    """(IA)^3: learned rescaling vectors on keys, values and feed-forward inputs."""

    method = "ia3"
    paper: ClassVar[str] = "Liu et al. 2022, arXiv:2205.05638"
    trainable: ClassVar[str] = "d_out per scaled output, d_in per scaled input"

    targets: str | list[str] | None = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Modules to rescale (keys, values and feed-forward projections by default)."""

    feedforward: list[str] = field(default_factory=lambda: list(DEFAULT_FEEDFORWARD))
    """Targets scaled on their input rather than their output (the feed-forward down-projection); names,
    regexes or roles, as `targets`."""

    def validate(self) -> None:
        if isinstance(self.feedforward, str):
            self.feedforward = [self.feedforward]
        if self.targets is None:
            raise ConfigError("IA3Config needs targets (for example ['k_proj', 'v_proj', 'down_proj'], or the "
                              f"default roles {DEFAULT_TARGETS})")


class IA3Linear(AdapterLayer):
    """(IA)^3 on nn.Linear / GPT-2 Conv1D: `ia3_l` scales the output, or the input when feedforward.

    On a fused q/k/v projection selected through roles, `ia3_l` holds the key/value rows only and
    `rows` (a buffer, not saved) places them in the output; the other rows keep scale 1.
    """

    def __init__(self, base: nn.Module, feedforward: bool, name: str = "", cfg: IA3Config | None = None) -> None:
        super().__init__(base)
        self.feedforward, self.name, self.cfg = feedforward, name, cfg
        self.register_buffer("rows", None, persistent=False)
        self._make_scale()

    def _make_scale(self) -> None:
        d_in, d_out = weights.in_out_features(self.base)
        w = weights.get_weight(self.base)
        shape = (1, d_in) if self.feedforward else (d_out if self.rows is None else len(self.rows), 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=adapter_dtype(w)))

    def resolve_roles(self, root: nn.Module) -> None:
        """Resolve role patterns against the model: input scaling, or the key/value rows of a fused projection."""
        cfg = self.cfg
        if cfg is None:
            return
        feedforward = any(architectures.matches_target(root, self.name, p) for p in cfg.feedforward)
        named = any(not architectures.is_role(p) and matches(self.name, p) for p in _listed(cfg.targets))
        rows = None  # named explicitly, a fused projection is scaled whole, as peft does
        if not feedforward and not named and self.name in architectures.modules_with_role(root, "qkv"):
            split = architectures.qkv_rows(root, self.name)
            wanted = [r for r in architectures.PROJECTIONS if self.name in _role_hits(root, cfg.targets, r)]
            rows = torch.cat([split[r] for r in wanted]).sort().values.to(self.ia3_l.device)
        if feedforward != self.feedforward or rows is not None:
            self.feedforward, self.rows = feedforward, rows
            self._make_scale()

    def scale(self) -> torch.Tensor:
        """The scale vector over the whole output (or input): `ia3_l`, with ones outside `rows`."""
        l_vec = self.ia3_l.flatten()
        if self.rows is None:
            return l_vec
        full = torch.ones(weights.in_out_features(self.base)[1], device=l_vec.device, dtype=l_vec.dtype)
        return full.index_put((self.rows,), l_vec)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scale = self.scale()
        if self.feedforward:
            return self.base((x * scale).to(x.dtype), *args, **kwargs)
        y = self.base(x, *args, **kwargs)
        return (y * scale).to(y.dtype)

    def _shaped(self, dtype: torch.dtype) -> torch.Tensor:
        scale = self.scale().to(dtype)
        return scale.unsqueeze(0) if self.feedforward else scale.unsqueeze(1)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self._shaped(weight.dtype)  # (d_out, 1) scales rows, (1, d_in) columns

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / (self._shaped(weight.dtype) + 1e-8)

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        return bias if self.feedforward or bias is None else bias * self.scale().to(bias.dtype)

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.feedforward else bias / (self.scale().to(bias.dtype) + 1e-8)

    def extra_repr(self) -> str:
        rows = "" if self.rows is None else f", rows={len(self.rows)} of {weights.in_out_features(self.base)[1]}"
        return f"scales={'input' if self.feedforward else 'output'}{rows}"


def _listed(patterns: str | list[str] | None) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns or [])


@register_model_adapter(IA3Config)
class RoleResolution(ModelAdapter):
    """Roles ("role:ffn", the key/value rows of a fused q/k/v) are known from the whole model only."""

    def attach(self, model: nn.Module, layers: dict) -> None:
        super().attach(model, layers)
        for layer in layers.values():
            layer.resolve_roles(model)


def _role_hits(root: nn.Module, targets, role: str) -> set[str]:
    """Modules selected through `role:<role>` in `targets` (empty when that role is not listed)."""
    token = architectures.ROLE_PREFIX + role
    return set(architectures.modules_with_role(root, role)) if token in _listed(targets) else set()


@register(IA3Config)
def build(module: nn.Module, cfg: IA3Config, name: str) -> IA3Linear | None:
    """Wrap linear layers; feed-forward targets get input scaling (role patterns are resolved by `RoleResolution`)."""
    if not weights.is_linear(module):
        return None
    plain = [p for p in cfg.feedforward if not architectures.is_role(p)]
    return IA3Linear(module, feedforward=any(matches(name, p) for p in plain), name=name, cfg=cfg)
