"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,     y = W' x + b0

with a trainable magnitude m in R^{d_out} initialised to ||W0||_row (so the model is unchanged at
init), the LoRA factors A, B as in LoRA, and the norm taken over the input dimension of each output
row (peft's `lora_magnitude_vector` convention). As in the paper (Sec. 4.3) and peft, the norm is
detached: gradients do not flow through it.

The row norm is computed without materialising W0 + s B A:

    ||W0 + s B A||_i^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 B_i (A A^T) B_i^T,

which costs d_out x d_in x r multiply-adds instead of a weight-sized temporary every step.
Unmerged forward: y = (m / n) * (W0 x + s B A dropout(x)) + b0. Linear layers only.
Trainable per layer: r (d_in + d_out) + d_out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.registry import register
from .lora import LoRAConfig, LoRALinear


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA: LoRA direction plus a trainable per-row magnitude."""

    method = "dora"
    paper: ClassVar[str] = "Liu et al. 2024, arXiv:2402.09353"
    trainable: ClassVar[str] = "r (d_in + d_out) + d_out per layer"

    def validate(self) -> None:
        super().validate()

    # Hugging Face peft: a LoraConfig with use_dora=True (to/from_peft_config are LoRA's)
    peft_variant: ClassVar[dict] = {"use_dora": True}


class DoRALinear(LoRALinear):
    """DoRA on nn.Linear and GPT-2 Conv1D."""

    peft_names = {**LoRALinear.peft_names, "magnitude": "lora_magnitude_vector"}

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str) -> None:
        super().__init__(base, r, scaling, dropout, init)
        self.magnitude = nn.Parameter(torch.ones(weights.in_out_features(base)[1], dtype=self.lora_A.dtype,
                                                 device=self.lora_A.device))
        self._merged_norm: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.magnitude.copy_(self.row_norm())

    def row_norm(self) -> torch.Tensor:
        """||W0 + s B A|| per output row, detached, without forming the sum (see module docstring)."""
        with torch.no_grad():
            w = weights.get_weight(self.base).to(self.lora_A.dtype)  # (d_out, d_in)
            a, b, s = self.lora_A, self.lora_B, self.scaling
            w_at = w @ a.T  # (d_out, r)
            sq = w.pow(2).sum(1) + 2 * s * (b * w_at).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)
            return sq.clamp_min(0).sqrt()

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = self.magnitude / self.row_norm()  # (d_out,)
        bias = self.bias
        y_nobias = y if bias is None else y - bias
        # W0 x + s B A x through LoRA's low_rank: added into the base output in place (no second
        # (tokens, d_out) tensor) when dtypes agree; y is cast to the adapter dtype first as before
        direction = self.low_rank(self.dropout(x), y_nobias.to(scale.dtype), self.lora_A, self.lora_B)
        out = scale * direction
        return (out if bias is None else out + bias).to(y.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        norm = self.row_norm()
        self._merged_norm = norm
        return (self.magnitude / norm)[:, None] * (weight + self.delta_weight().to(weight.dtype))

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        norm = self._merged_norm if self._merged_norm is not None else weight.norm(dim=1)
        return weight * (norm / self.magnitude)[:, None] - self.delta_weight().to(weight.dtype)


@register(DoRAConfig)
def build(module: nn.Module, cfg: DoRAConfig, name: str) -> DoRALinear | None:
    """DoRA wraps linear layers only; other matched modules are left alone."""
    if not weights.is_linear(module):
        return None
    return DoRALinear(module, cfg.rank_for(name), cfg.scaling_for(name), cfg.dropout, cfg.init)
