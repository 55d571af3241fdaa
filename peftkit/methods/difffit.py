"""DiffFit: BitFit plus learned residual-branch scales (Xie et al., 2023, arXiv:2304.06648).

In a transformer block (DiT in the paper)

    x <- x + γ1 ⊙ Attn(LN(x)),     x <- x + γ2 ⊙ MLP(LN(x)),     γ initialised to 1 (identity at init),

and every bias and every norm parameter of the backbone trains too. Each γ sits as an output scale on the
branch's last linear layer (attention out-projection, MLP down-projection / fc2), so merging folds it into
that layer: W <- diag(γ) W, b <- γ ⊙ b (zero inference cost).

Trainable: Σ bias sizes + Σ norm parameter sizes (outside the head) + per scaled branch 1 (scalar γ) or
d_out (`per_channel=True`).

Choices (methods.md marks them UNVERIFIED):

* scalar or vector γ: the paper uses one scalar per branch (default), the unofficial implementation
  (mkshing/DiffFit-pytorch) a per-channel vector: `per_channel=True`;
* which blocks get γ: the paper reportedly scales only a subset of DiT-XL/2's blocks (1-14 of 28); the
  default here is every block, and `layers` picks a subset. Biases and norms train in every block
  regardless, as in BitFit;
* the class (label) embedding that DiT also trains is model-specific: name it in `modules_to_save`.

The wrapping reuses SSF's scale layer (`ssf.SSFLayer` without a shift); the bias/norm selection is
BitFit's and LN tuning's (`selective.py`). The method registers both a builder and a selector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn as nn

from ..core.config import AdapterConfig, ConfigError
from ..core.registry import register, register_selection
from .selective import bias_parameter_names, norm_parameter_names
from .ssf import SSFLayer, module_kind

DEFAULT_TARGETS = ["role:attn-out", "role:mlp-down"]
"""The last linear layer of each residual branch, as roles resolved per architecture (core/architectures.py)."""


@dataclass
class DiffFitConfig(AdapterConfig):
    """DiffFit: biases and norms train, plus a learned scale γ on each residual branch."""

    method = "difffit"
    paper: ClassVar[str] = "Xie et al. 2023, arXiv:2304.06648"
    trainable: ClassVar[str] = "biases + norm parameters + 1 (or d_out) per scaled residual branch"

    targets: str | list[str] | None = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """The last linear layer of each residual branch (gets γ): the attention output and MLP down projection
    roles by default, on every architecture `core.architectures` knows (names in unknown models)."""

    layers: list[int] | None = None
    """Blocks whose residual branches get γ (default: all; the paper reportedly uses a subset,
    UNVERIFIED). Biases and norms train in every block."""

    per_channel: bool = False
    """γ as a vector over the branch's output channels (unofficial implementation) instead of one
    scalar per branch (paper)."""

    def validate(self) -> None:
        if not self.targets:
            raise ConfigError("DiffFitConfig needs targets: the last linear layer of each residual branch "
                              f"(default {DEFAULT_TARGETS})")


class DiffFitScale(SSFLayer):
    """y = γ ⊙ base(x) on a residual branch's last layer, γ = 1 at init (SSF's layer without a shift)."""


@register(DiffFitConfig)
def build(module: nn.Module, cfg: DiffFitConfig, name: str) -> DiffFitScale | None:
    """Scale the output of a linear (or Conv2d) branch end; other matched modules are left alone."""
    kind = module_kind(module)
    if kind not in ("linear", "conv1d", "conv2d"):
        return None
    return DiffFitScale(module, kind, shift=False, init_std=0.0, module_name=name,
                        scale_size=None if cfg.per_channel else 1)


@register_selection(DiffFitConfig)
def select(model: nn.Module, cfg: DiffFitConfig) -> list[str]:
    """Every bias and norm parameter of the backbone (the wrapped layers' own biases included)."""
    return bias_parameter_names(model) + norm_parameter_names(model)
