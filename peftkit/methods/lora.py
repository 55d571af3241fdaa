"""LoRA: low-rank adaptation of a frozen weight (Hu et al., 2021, arXiv:2106.09685).

    y = W0 x + b0 + s * B A dropout(x),   A in R^{r x d_in}, B in R^{d_out x r},
    s = alpha / r   (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732: s = alpha / sqrt(r)).

Merging folds the update: W = W0 + s B A. Trainable parameters per layer: r (d_in + d_out).

Initialisations are a table of functions (`INITS`), keyed by `LoRAConfig.init`:

* "kaiming" (default): A ~ kaiming_uniform(a=sqrt(5)), B = 0, so the model is unchanged at init;
* "gaussian": A ~ N(0, 1/r^2), B = 0 (peft's "gaussian");
* "pissa" (Meng et al., 2024, arXiv:2404.02948): A, B from the top-r SVD of W0,
  A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s); the base keeps the residual W0 - s B A;
* "olora" (Buyukakyuz, 2024, arXiv:2406.01775): W0 = Q R, B = Q[:, :r], A = R[:r]; residual likewise.

The two base-changing inits keep their initial factors as buffers (`lora_A0`, `lora_B0`), so a
saved adapter re-derives the residual from the original base when loaded, `unload` without merging
adds s B0 A0 back, and the Hugging Face export folds them into a plain rank-2r LoRA. That restore is
exact only up to rounding: the residual W0 - s B0 A0 was rounded to the base dtype, which loses bits
where |s B0 A0| > |W0|, so about a fifth of the elements come back one unit in the last place off
(float32: ~4e-9 on weights of size ~0.02; bfloat16: one bf16 ulp). Bit-exact cases: a failed `apply` or
`load` (the base is copied before the init), and a tied base weight (the init works on a private copy,
and unloading puts the untouched shared tensor back). For a bit-exact W0 otherwise, keep the base's
state dict. The layers set `rewrites_base`, so `apply` takes that copy and unties first.

Layers: `nn.Linear` and GPT-2 `Conv1D` (LoRALinear), `nn.Embedding` (LoRAEmbedding, peft's
layout: A zero, B normal), `nn.Conv2d` (LoRAConv2d: A is an r-channel conv, B a 1x1 conv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.inject import matches
from ..core.layer import AdapterLayer
from ..core.registry import register
from .lowrank import LinearLowRank, add_low_rank, owns_plain_linear


@dataclass
class LoRAConfig(AdapterConfig):
    """Low-rank adaptation of linear, embedding and conv layers."""

    method = "lora"
    paper: ClassVar[str] = "Hu et al. 2021, arXiv:2106.09685 (rsLoRA 2312.03732, PiSSA 2404.02948, OLoRA 2406.01775)"
    trainable: ClassVar[str] = "r (d_in + d_out) per layer"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); every linear layer but the head by default."""

    r: int = 8
    """Rank of the update."""

    alpha: float = 8.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""

    dropout: float = 0.0
    """Dropout probability on the input of the low-rank path."""

    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""

    init: str = "kaiming"
    """Initialisation: one of "kaiming", "gaussian", "pissa", "olora"."""

    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks, {target pattern: r}, overriding `r` where a pattern matches."""

    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas, {target pattern: alpha}, overriding `alpha` where a pattern matches."""

    def validate(self) -> None:
        ranks = [self.r, *self.rank_pattern.values()]
        if any(not isinstance(r, int) or r < 1 for r in ranks):
            raise ConfigError(f"LoRA rank must be a positive integer, got r={self.r}, rank_pattern={self.rank_pattern}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ConfigError(f"unknown LoRA init {self.init!r}; choose one of {', '.join(INITS)}")

    def rank_for(self, name: str) -> int:
        """Rank of module `name` (first matching rank_pattern entry, else r)."""
        return next((r for p, r in self.rank_pattern.items() if matches(name, p)), self.r)

    def alpha_for(self, name: str) -> float:
        """Alpha of module `name` (first matching alpha_pattern entry, else alpha)."""
        return next((a for p, a in self.alpha_pattern.items() if matches(name, p)), self.alpha)

    def scaling_for(self, name: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rslora."""
        r = self.rank_for(name)
        return self.alpha_for(name) / (math.sqrt(r) if self.rslora else r)


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 unless the base already is float64."""
    return base_weight.dtype if base_weight.dtype == torch.float64 else torch.float32


class LoRALayer(AdapterLayer):
    """Shared LoRA bookkeeping: factors, scaling, dropout, inits, base-changing init buffers."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str,
                 a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
        super().__init__(base)
        w = weights.get_weight(base)
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.r, self.scaling, self.init = r, scaling, init
        self.rewrites_base = INITS[init].changes_base  # apply copies (and unties) the base before the init
        self.lora_A = nn.Parameter(torch.zeros(a_shape, **kw))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if INITS[init].changes_base:
            self.register_buffer("lora_A0", torch.zeros(a_shape, **kw))
            self.register_buffer("lora_B0", torch.zeros(b_shape, **kw))

    def reset_parameters(self) -> None:
        INITS[self.init](self)

    def factor_product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """B @ A in canonical weight layout (overridden for conv and embedding)."""
        return b @ a

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.factor_product(self.lora_A, self.lora_B)

    def _shift_base(self, sign: float) -> None:
        w = weights.get_weight(self.base).float()
        weights.set_weight(self.base, w + sign * self.scaling * self.factor_product(self.lora_A0, self.lora_B0))

    def after_load(self) -> None:
        if hasattr(self, "lora_A0"):
            self._shift_base(-1.0)  # the base holds W0 - s B0 A0, as after the init

    def restore_base(self) -> None:
        if hasattr(self, "lora_A0"):
            self._shift_base(+1.0)

    def routes_by_adapt(self) -> bool:
        return not hasattr(self, "lora_A0")  # the fused forward is adapt(x, base(x)); PiSSA's base is not the base

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if not hasattr(self, "lora_A0"):
            return y
        # the base holds W0 - s B0 A0: add the initial factors back to show the original model
        return self.low_rank(x, y, self.lora_A0, self.lora_B0)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, init={self.init}"


class LoRALinear(LoRALayer):
    """LoRA on nn.Linear and GPT-2 Conv1D."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str) -> None:
        d_in, d_out = weights.in_out_features(base)
        if r > min(d_in, d_out) and INITS[init].changes_base:
            raise ConfigError(f"{init} needs r <= min(d_in, d_out) = {min(d_in, d_out)}, got r={r}")
        super().__init__(base, r, scaling, dropout, init, (r, d_in), (d_out, r))

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base GEMM and the update in one Function (`LinearLowRank`: dL/dx summed in place) where the
        base is a plain frozen nn.Linear, else base(x) followed by `adapt`."""
        if args or kwargs or not self._owns_base(x):
            return self.adapt(x, self.base(x, *args, **kwargs))
        return LinearLowRank.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling)

    def _owns_base(self, x: torch.Tensor) -> bool:
        # subclasses that change the update (DSEE's sparse part, PEGO's group) keep the two-step path
        plain = type(self).adapt is LoRALinear.adapt and type(self).low_rank is LoRALinear.low_rank
        return plain and owns_plain_linear(self.base, x, self.lora_A, self.dropout)

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.low_rank(self.dropout(x), y, self.lora_A, self.lora_B)

    def low_rank(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y + s B A x (see `lowrank.add_low_rank`)."""
        return add_low_rank(y, x, a, b, self.scaling)


class LoRAEmbedding(LoRALayer):
    """LoRA on nn.Embedding: delta = s (B A)^T with A (r, num_embeddings), B (dim, r)."""

    def __init__(self, base: nn.Embedding, r: int, scaling: float, dropout: float, init: str) -> None:
        if INITS[init].changes_base:
            raise ConfigError(f"init {init!r} is defined for linear layers only, not nn.Embedding")
        super().__init__(base, r, scaling, 0.0, init, (r, base.num_embeddings), (base.embedding_dim, r))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.lora_A)  # peft's embedding layout: A zero, B normal
        nn.init.normal_(self.lora_B)

    def factor_product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b @ a).T  # (num_embeddings, dim)

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = self.base
        h = F.embedding(x, self.lora_A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        # a scaled embedding (Gemma's: W[x] * embed_scale in its forward) scales the update too, as merging
        # it into W does (peft likewise)
        b = self.lora_B * self.scaling
        scale = getattr(e, "embed_scale", None)
        if scale is not None and torch.as_tensor(scale).numel() == 1:
            b = b * torch.as_tensor(scale, device=b.device).to(b.dtype)
        return y + F.linear(h, b).to(y.dtype)  # (..., dim)


class LoRAConv2d(LoRALayer):
    """LoRA on nn.Conv2d (groups=1): A is an r-channel conv with the base's kernel, B a 1x1 conv."""

    def __init__(self, base: nn.Conv2d, r: int, scaling: float, dropout: float, init: str) -> None:
        if INITS[init].changes_base:
            raise ConfigError(f"init {init!r} is defined for linear layers only, not nn.Conv2d")
        a_shape = (r, base.in_channels, *base.kernel_size)
        super().__init__(base, r, scaling, dropout, init, a_shape, (base.out_channels, r, 1, 1))

    def factor_product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.base
        h = F.conv2d(self.dropout(x).to(self.lora_A.dtype), self.lora_A, None, c.stride, c.padding, c.dilation)
        return y + F.conv2d(h, self.lora_B * self.scaling).to(y.dtype)


# --- initialisations: a table of functions ---------------------------------------------------
class _Init:
    """An init function plus whether it rewrites the base weight."""

    def __init__(self, fn, changes_base: bool = False) -> None:
        self.fn, self.changes_base = fn, changes_base

    def __call__(self, layer: LoRALayer) -> None:
        with torch.no_grad():
            self.fn(layer)


def _init_kaiming(layer: LoRALayer) -> None:
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B)


def _init_gaussian(layer: LoRALayer) -> None:
    nn.init.normal_(layer.lora_A, std=1 / layer.r)
    nn.init.zeros_(layer.lora_B)


def _set_base_factors(layer: LoRALayer, a: torch.Tensor, b: torch.Tensor) -> None:
    layer.lora_A.copy_(a)
    layer.lora_B.copy_(b)
    layer.lora_A0.copy_(a)
    layer.lora_B0.copy_(b)
    layer._shift_base(-1.0)  # W_res = W0 - s B A


def _init_pissa(layer: LoRALayer) -> None:
    w = weights.get_weight(layer.base).float()  # (d_out, d_in)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(s[: layer.r] / layer.scaling)
    _set_base_factors(layer, root[:, None] * vh[: layer.r], u[:, : layer.r] * root[None, :])


def _init_olora(layer: LoRALayer) -> None:
    q, r = torch.linalg.qr(weights.get_weight(layer.base).float())
    _set_base_factors(layer, r[: layer.r], q[:, : layer.r])


INITS: dict[str, _Init] = {
    "kaiming": _Init(_init_kaiming),
    "gaussian": _Init(_init_gaussian),
    "pissa": _Init(_init_pissa, changes_base=True),
    "olora": _Init(_init_olora, changes_base=True),
}

LAYERS: dict[str, type[LoRALayer]] = {
    "linear": LoRALinear,
    "conv1d": LoRALinear,
    "embedding": LoRAEmbedding,
    "conv2d": LoRAConv2d,
}
"""Dispatch as data: base layer kind -> LoRA layer class."""


@register(LoRAConfig)
def build(module: nn.Module, cfg: LoRAConfig, name: str) -> LoRALayer | None:
    """Wrap `module` in the LoRA layer for its kind (None for unsupported kinds)."""
    kind = weights.layer_kind(module)
    if kind not in LAYERS or (kind == "conv2d" and module.groups != 1):
        return None
    return LAYERS[kind](module, cfg.rank_for(name), cfg.scaling_for(name), cfg.dropout, cfg.init)
