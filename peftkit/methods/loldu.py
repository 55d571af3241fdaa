"""LoLDU: fine-tune the diagonal of an LDU decomposition (Shi et al., 2024, arXiv:2410.13618).

    W0 = P L U (LU with partial pivoting, float64),  D = diag(U),  U <- U / D[:, None]  (unit diagonal),
    L_r = L[:, :r],  U_r = U[:r, :],  s = alpha / r,  z in R^r trainable (init from D_r, `init`),
    W_res = W0 - s0 P L_r diag(z0) U_r   (frozen),    W = W_res + s P L_r diag(z) U_r.

Implemented as y = W0 x + b0 + P L_r ((s z - s0 z0) * (U_r x)) (diagonal_basis.py): the same W,
with the base weight untouched, no residual buffer, the identity at init exactly and no
(d_out, d_in) matrix built per step. dL/dz_i = s (L_r^T P^T G U_r^T)_ii with G = dL/dW.
Trainable per layer: r, plus 1 with `train_scale`.

Choices:
* `r=None` (default) is full rank, min(d_in, d_out), as the reference code's default (rank 768 on
  ViT-B). The per-step cost is a rank-r LoRA's forward, so pass a smaller r when speed matters.
* `alpha` defaults to 1, the reference code's `from_linear` default (s = 1 / r). The unit-diagonal
  U rows and the columns of L are long vectors, and s = 1 / r keeps the update per unit change of z
  moderate; with Adam the useful learning rate scales roughly with r / alpha.
* The scale s is a Parameter in the reference code, but its parameter collector returns only z, so
  whether the paper trains s is UNVERIFIED (methods.md). `train_scale=False` (default) keeps s
  fixed; True trains it too (one more parameter per layer, init alpha / r).
* Zero pivots: a rank-deficient W0 has (near-)zero D_i, and U / D would be inf or NaN. Where
  |D_i| <= max(d_in, d_out) * eps_fp32 * max|D| (the round-off level of an fp32 weight) the row of U
  is left as it is and D_i is taken as 1, so D U still equals the LU factor U exactly.
* The inits of z are those named in the reference code: "lu" (z = D_r), "uniform"
  (U(-|m|/2, |m|/2), m = mean D_r), "normal" (N(mean D_r, std D_r)), "constant" (mean D_r), "ones",
  "zeros". Every one is the identity at init, since W_res absorbs s0 P L_r diag(z0) U_r.

Saved adapter: z, z0 and the frozen P L_r, U_r (a rank-r LoRA's size). Recomputing them on load
is not safe: partial pivoting picks the largest candidate, and near-ties can pick another row on
another BLAS or device, which changes L and U entirely. Apply-time cost: a float64 LU of a
576 x 1536 weight takes ~0.01 s (2 shared CPU cores, noisy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.registry import register
from .diagonal_basis import DiagonalBasisLayer


@dataclass
class LoLDUConfig(AdapterConfig):
    """Train the leading r entries of the diagonal D of W0 = P L D U, plus optionally the scale."""

    method = "loldu"
    paper: ClassVar[str] = "Shi et al. 2024, arXiv:2410.13618"
    trainable: ClassVar[str] = "r per layer (r + 1 with train_scale)"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); every linear layer but the head by default."""

    r: int | None = None
    """Number of leading diagonal entries trained per layer; None is full rank, min(d_in, d_out)."""

    alpha: float = 1.0
    """Scale numerator: the update is multiplied by s = alpha / r."""

    init: str = "lu"
    """Initial z: "lu" (the pivots D_r), "uniform", "normal", "constant", "ones" or "zeros"."""

    train_scale: bool = False
    """Also train the scale s (one parameter per layer); UNVERIFIED whether the paper does."""

    def validate(self) -> None:
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1):
            raise ConfigError(f"LoLDU r must be a positive integer or None (full rank), got r={self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha == 0:
            raise ConfigError(f"LoLDU alpha must be a finite non-zero number (scale alpha / r), got {self.alpha!r}")
        if self.init not in Z_INITS:
            raise ConfigError(f"unknown LoLDU init {self.init!r}; choose one of {', '.join(Z_INITS)}")


def ldu_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L_r, D_r, U_r) in float64 with W0 = (P L) diag(D) U, U of unit diagonal (zero pivots guarded).

    Shapes for W0 (m, n), k = min(m, n): P L_r (m, r), D_r (r,), U_r (r, n).
    """
    p, lower, upper = torch.linalg.lu(weight.double())  # (m, m), (m, k), (k, n)
    d = upper.diagonal()
    tolerance = max(weight.shape) * torch.finfo(torch.float32).eps * d.abs().max()
    d = torch.where(d.abs() > tolerance, d, torch.ones_like(d))  # zero pivot: keep that row of U as it is
    return p @ lower[:, :r], d[:r], upper[:r] / d[:r, None]


def _z_uniform(d: torch.Tensor) -> torch.Tensor:
    half = d.mean().abs() / 2
    return (torch.rand(d.shape, dtype=d.dtype) * 2 - 1) * half


def _z_normal(d: torch.Tensor) -> torch.Tensor:
    std = d.std() if d.numel() > 1 else d.new_zeros(())
    return d.mean() + std * torch.randn(d.shape, dtype=d.dtype)


Z_INITS = {
    "lu": lambda d: d.clone(),
    "uniform": _z_uniform,
    "normal": _z_normal,
    "constant": lambda d: torch.full_like(d, float(d.mean())),
    "ones": torch.ones_like,
    "zeros": torch.zeros_like,
}
"""Initial z from the pivots D_r (float64, CPU, torch's global generator for the random ones)."""


class LoLDULinear(DiagonalBasisLayer):
    """LoLDU on nn.Linear and GPT-2 Conv1D: basis_out = P L_r, basis_in = U_r, trainable z."""

    def __init__(self, base: nn.Module, r: int | None, alpha: float, init: str, train_scale: bool,
                 name: str = "") -> None:
        d_in, d_out = weights.in_out_features(base)
        rank = min(d_in, d_out) if r is None else r
        if rank > min(d_in, d_out):
            raise ConfigError(f"LoLDU r={rank} is larger than min(d_in, d_out) = {min(d_in, d_out)} of "
                              f"{name or 'a layer'} (d_out x d_in = {d_out} x {d_in}); use r <= {min(d_in, d_out)} "
                              "or r=None for full rank")
        super().__init__(base, rank)
        self.init, self.scale0 = init, alpha / rank
        kw = self.factor_kwargs
        self.register_buffer("z0", torch.zeros(rank, **kw))
        self.register_buffer("pivots", torch.zeros(rank, **kw), persistent=False)  # D_r, for re-initialising z
        self.z = nn.Parameter(torch.zeros(rank, **kw))
        self.scale: nn.Parameter | float = nn.Parameter(torch.tensor(self.scale0, **kw)) if train_scale else self.scale0
        b, d, a = ldu_factors(weights.get_weight(base), rank)
        with torch.no_grad():  # the basis is structure, fixed by the base (reset_parameters does not redo it)
            self.basis_out.copy_(b)
            self.basis_in.copy_(a)
            self.pivots.copy_(d)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.z0.copy_(Z_INITS[self.init](self.pivots.double().cpu()))
            self.z.copy_(self.z0)
            if isinstance(self.scale, nn.Parameter):
                self.scale.fill_(self.scale0)

    def diagonal(self) -> torch.Tensor:
        e = self.scale * (self.z - self.z0)  # s z - s0 z0, written so that it is exactly 0 at init
        if isinstance(self.scale, nn.Parameter):
            e = e + (self.scale - self.scale0) * self.z0
        return e

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale0:g}, init={self.init}"


@register(LoLDUConfig)
def build(module: nn.Module, cfg: LoLDUConfig, name: str) -> LoLDULinear | None:
    """LoLDU wraps linear layers (nn.Linear, GPT-2 Conv1D) only."""
    if not weights.is_linear(module):
        return None
    return LoLDULinear(module, cfg.r, cfg.alpha, cfg.init, cfg.train_scale, name)
