"""Bottleneck adapters, in series (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al., 2021,
arXiv:2005.00247) or in parallel (He et al., 2022, arXiv:2110.04366), as compared on LLMs by
LLM-Adapters (Hu et al., 2023, arXiv:2304.01933).

    series:    y = M(x),   y <- y + s (U f(D y + b_D) + b_U)    (after the sub-layer module M)
    parallel:  y = M(x) + s (U f(D x + b_D) + b_U)              (alongside M, from M's input)

D in R^{m x d_in}, U in R^{d_out x m}, f in {relu, gelu, silu, tanh}, m the bottleneck size.
U and b_U start at zero, so the model is unchanged at init; D ~ kaiming_uniform(a=sqrt(5)),
b_D = 0 (LLM-Adapters' "mam_adapter" init; its default "bert" init, N(0, 0.02) for both D and
U, is not the identity). Not mergeable: f is nonlinear.

Trainable per adapter: 2 d m + m + d (series on a d-wide output; parallel with d_in = d_out = d),
in general m (d_in + d_out) + m + d_out.

Placement (`kind`, each with default targets written as roles, resolved per architecture by
`core.architectures`: GPT-NeoX's `attention.dense`, OPT's `fc2`, T5's `DenseReluDense` ...):

* "houlsby": series after the attention output projection and after the MLP down projection;
* "pfeiffer": series after the MLP only;
* "parallel": wraps the whole MLP module (its input is the block input after the norm).

Choices where methods.md says UNVERIFIED or nothing: m = 64 by default (LLM-Adapters used 256 on
LLaMA-7B; 64 suits the d = 384..4096 models peftkit targets and keeps the step cheap); f = relu
(Pfeiffer/AdapterHub's default; LLM-Adapters' default is tanh, also available); the adapters have
biases (Houlsby's formulation and the 2dm + m + d count; LLM-Adapters' have none); s = 1 (He et al.
use s = 4 for parallel FFN adapters: set `scaling`). BERT-style models split the feed-forward across
`intermediate` and `output` (and OPT puts fc1/fc2 in the layer itself), so "parallel" has no default
there: apply refuses, naming the architecture; give `targets` explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import architectures, weights
from ..core.config import AdapterConfig, ConfigError
from ..core.inject import layer_index
from ..core.layer import AdapterLayer
from ..core.model_adapter import ModelAdapter
from ..core.registry import register, register_model_adapter
from .lora import adapter_dtype

DEFAULT_TARGETS: dict[str, list[str]] = {
    "houlsby": ["role:attn-out", "role:mlp-down"],
    "pfeiffer": ["role:mlp-down"],
    "parallel": ["role:mlp"],
}
"""kind -> default targets; "houlsby" and "pfeiffer" are series adapters, "parallel" is not."""


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters after (series) or alongside (parallel) transformer sub-layers."""

    method = "adapter"
    paper: ClassVar[str] = ("Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021, arXiv:2005.00247; "
                            "He et al. 2022, arXiv:2110.04366; LLM-Adapters, Hu et al. 2023, arXiv:2304.01933")
    trainable: ClassVar[str] = "2 d m + m + d per adapter (bottleneck m, width d)"

    kind: str = "houlsby"
    """"houlsby" (series after attention and MLP), "pfeiffer" (series after the MLP) or "parallel"
    (alongside the MLP)."""

    targets: str | list[str] | None = None
    """Modules to adapt; None takes the kind's defaults (roles: attention output, MLP down projection, MLP).
    Targets given explicitly must each match a module of the model."""

    bottleneck: int = 64
    """Bottleneck size m (LLM-Adapters used 256 on LLaMA-7B)."""

    activation: str = "relu"
    """Nonlinearity f: "relu", "gelu", "silu" or "tanh" (LLM-Adapters' default)."""

    scaling: float = 1.0
    """Scale s of the adapter output (He et al. use 4 for parallel adapters)."""

    def validate(self) -> None:
        if self.kind not in DEFAULT_TARGETS:
            raise ConfigError(f"unknown adapter kind {self.kind!r}; choose one of {', '.join(DEFAULT_TARGETS)}")
        if not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ConfigError(f"bottleneck size must be a positive integer, got {self.bottleneck!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ConfigError(f"scaling must be a finite number, got {self.scaling!r}")
        if self.targets is None:
            self.targets = list(DEFAULT_TARGETS[self.kind])

    @property
    def parallel(self) -> bool:
        """True for parallel adapters (input from the module's input), False for series ones."""
        return self.kind == "parallel"


# --- activations: f and its derivative from the pre-activation z (and a = f(z)) ---------------
ACTIVATIONS = {
    "relu": (F.relu, lambda g, z, a: g.masked_fill(z <= 0, 0.0)),
    "gelu": (F.gelu, lambda g, z, a: torch.ops.aten.gelu_backward(g, z)),
    "silu": (F.silu, lambda g, z, a: torch.ops.aten.silu_backward(g, z)),
    "tanh": (torch.tanh, lambda g, z, a: torch.ops.aten.tanh_backward(g, a)),
}


class BottleneckAdd(torch.autograd.Function):
    """y + s (U f(D h + b_D) + b_U) for a base output y (..., d_out) and adapter input h (..., d_in).

    Why a Function: autograd would save h, z = D h + b_D and a = f(z) and record six nodes; this
    saves h and z only (a is recomputed in backward, m wide), and the sum is one fused `addmm`.
    A series adapter reads y itself and passes h = None: torch.compile cannot trace a Function given
    the same tensor twice (a graph break per adapter), so backward adds both gradients of y itself.
    """

    @staticmethod
    def forward(ctx, y, h, down, down_bias, up, up_bias, scaling: float, activation: str):
        ctx.series = h is None
        h = y if h is None else h
        h2 = h.reshape(-1, h.shape[-1])  # (tokens, d_in)
        z = torch.addmm(down_bias, h2, down.t())  # (tokens, m)
        a = ACTIVATIONS[activation][0](z)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), a, up.t(), alpha=scaling)  # (tokens, d_out)
        out.add_(up_bias, alpha=scaling)
        ctx.save_for_backward(h, z, down, up)
        ctx.scaling, ctx.activation = scaling, activation
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad):
        h, z, down, up = ctx.saved_tensors
        f, f_grad = ACTIVATIONS[ctx.activation]
        a = f(z)
        g2 = grad.reshape(-1, grad.shape[-1]).mul(ctx.scaling)  # (tokens, d_out), already scaled by s
        need = ctx.needs_input_grad
        d_up = (a.t() @ g2).t() if need[4] else None  # (d_out, m)
        d_up_bias = g2.sum(0) if need[5] else None
        dz = f_grad(g2 @ up, z, a)  # (tokens, m)
        h2 = h.reshape(-1, h.shape[-1])
        d_down = dz.t() @ h2 if need[2] else None  # (m, d_in)
        d_down_bias = dz.sum(0) if need[3] else None
        dh = (dz @ down).view(h.shape) if need[1] or (ctx.series and need[0]) else None
        if ctx.series:  # y fed the adapter too: dL/dy = grad + dL/dh
            return grad if dh is None else grad + dh, None, d_down, d_down_bias, d_up, d_up_bias, None, None
        return grad, dh, d_down, d_down_bias, d_up, d_up_bias, None, None


def bottleneck_reference(y: torch.Tensor, h: torch.Tensor | None, down: torch.Tensor, down_bias: torch.Tensor,
                         up: torch.Tensor, up_bias: torch.Tensor, scaling: float, activation: str) -> torch.Tensor:
    """y + s (U f(D h + b_D) + b_U) in plain autograd; h None means h = y (series). What `BottleneckAdd` computes."""
    h = y if h is None else h
    return y + scaling * F.linear(ACTIVATIONS[activation][0](F.linear(h, down, down_bias)), up, up_bias)


def module_widths(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear layer, or of a block: its first linear's input, its last linear's output."""
    if weights.is_linear(module):
        return weights.in_out_features(module)
    linear = [m for m in module.modules() if weights.is_linear(m)]
    if not linear:
        raise ConfigError(f"a bottleneck adapter needs a linear layer or a block of them; {type(module).__name__} "
                          "has no linear layer to read its width from")
    return weights.in_out_features(linear[0])[0], weights.in_out_features(linear[-1])[1]


class BottleneckAdapter(AdapterLayer):
    """A bottleneck adapter after (series) or alongside (parallel) the wrapped module."""

    mergeable = False

    def __init__(self, base: nn.Module, cfg: BottleneckConfig) -> None:
        super().__init__(base)
        d_in, d_out = module_widths(base)
        width = d_in if cfg.parallel else d_out
        w = next(base.parameters())
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        m = cfg.bottleneck
        self.cfg = cfg
        self.parallel, self.scaling, self.activation = cfg.parallel, float(cfg.scaling), cfg.activation
        self.adapter_down = nn.Parameter(torch.zeros(m, width, **kw))
        self.adapter_down_bias = nn.Parameter(torch.zeros(m, **kw))
        self.adapter_up = nn.Parameter(torch.zeros(d_out, m, **kw))
        self.adapter_up_bias = nn.Parameter(torch.zeros(d_out, **kw))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.adapter_down, a=5**0.5)
        for p in (self.adapter_down_bias, self.adapter_up, self.adapter_up_bias):
            nn.init.zeros_(p)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"a bottleneck adapter needs a module that returns one tensor; {type(self.base).__name__} "
                            f"returns {type(y).__name__}: target its output projection instead")
        return self._add(y, x if self.parallel else None)

    def _add(self, y: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """y + the adapter's output on h (parallel: the module's input) or, for h None, on y (series)."""
        params = (self.adapter_down, self.adapter_down_bias, self.adapter_up, self.adapter_up_bias)
        device = y.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        else:  # a bf16 base with fp32 adapters computes the adapter in fp32, like LoRA
            dtype = torch.promote_types(y.dtype, self.adapter_down.dtype)
        with torch.autocast(device, enabled=False):
            out = BottleneckAdd.apply(y.to(dtype), None if h is None else h.to(dtype), *(p.to(dtype) for p in params),
                                      self.scaling, self.activation)
        return out.to(y.dtype)

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "series"
        return f"{kind}, m={self.adapter_down.shape[0]}, f={self.activation}, scaling={self.scaling:g}"

@register_model_adapter(BottleneckConfig)
class TargetCheck(ModelAdapter):
    """Once per adapter: every target pattern the user wrote names something in the model."""

    def attach(self, model: nn.Module, layers: dict) -> None:
        super().attach(model, layers)
        check_targets_exist(model, self.cfg)


def check_targets_exist(root: nn.Module, cfg: BottleneckConfig) -> None:
    """Every explicitly given target pattern and every `layers` index must name something in the model.

    Why: a default role may be absent from a model (the MLP down projection of an attention-only stack),
    but a name the user wrote that matches nothing is a typo or the wrong model, and should not pass.
    """
    patterns = [cfg.targets] if isinstance(cfg.targets, str) else list(cfg.targets)
    explicit = patterns != DEFAULT_TARGETS[cfg.kind]
    if not explicit and not cfg.layers:
        return
    names = [n for n, _ in root.named_modules() if n]
    missing = [p for p in patterns if explicit and not any(architectures.matches_target(root, n, p) for n in names)]
    if missing:
        inside = {n.split(".")[-1] for n in names if layer_index(n) == 0}
        blocks = sorted(b for b in inside if b != "base" and not b.isdigit())  # "base": adapter wrappers
        raise ConfigError(f"adapter target(s) {missing} match no module of {type(root).__name__}; "
                          f"module names inside block 0: {', '.join(blocks) or 'none'}")
    present = {layer_index(n) for n in names}
    absent = [i for i in cfg.layers or [] if i not in present]
    if absent:
        raise ConfigError(f"layers {absent} do not exist in {type(root).__name__} "
                          f"(blocks 0..{max((i for i in present if i is not None), default=-1)})")


@register(BottleneckConfig)
def build(module: nn.Module, cfg: BottleneckConfig, name: str) -> BottleneckAdapter | None:
    """Wrap a matched linear layer or block (a module with no linear layer inside is skipped)."""
    if not any(weights.is_linear(m) for m in module.modules()):
        return None
    return BottleneckAdapter(module, cfg)
