"""SVFit: fine-tune only the top-r singular values (Sun et al., 2024, arXiv:2409.05926).

    W0 = U S V^T (SVD in float64, then cast),   W_res = W0 - U_r diag(S_r) V_r^T   (frozen, with U_r, V_r),
    W  = W_res + U_r diag(sigma') V_r^T,        sigma' in R^r trainable, initialised to diag(S_r).

Implemented as y = W0 x + b0 + U_r ((sigma' - S_r) * (V_r^T x)) (diagonal_basis.py): the same W,
with the base weight left untouched, no (d_out, d_in) residual buffer and the identity at init
exactly. The gradient is dL/dsigma'_i = u_i^T G v_i with G = dL/dW. Trainable per layer: r.

Choosing r. A fixed `r`, or (`r=None`, the default) the smallest r whose singular values hold an
`energy` share of the spectrum: sum_{i<=r} s_i^2 / sum_i s_i^2 >= energy (0.99 by default). The paper's
abstract keeps the values that "capture over 99% of the matrix's information"; which measure of
information it means is UNVERIFIED (methods.md), and we chose the cumulative squared singular values
(the Frobenius energy of the best rank-r approximation, Eckart-Young), the usual reading. A zero
weight has no energy and gets r = 1. Pretrained weights have flat spectra, so 0.99 usually keeps
most of min(d_in, d_out) values: cheap in parameters, but the per-step cost is a rank-r LoRA's
forward (see diagonal_basis.py), so pass a fixed r when speed matters.

Saved adapter: sigma' and the frozen U_r, V_r^T, S_r (buffers of a rank-r LoRA's size). Why not
recompute them from the base on load: a paired sign flip (u_i, v_i) -> (-u_i, -v_i) would be harmless,
but singular vectors of (nearly) equal singular values are only defined up to a rotation, which can
differ between LAPACK builds, devices and a base that differs within the fingerprint tolerance; the
trained sigma' would then scale other directions. Saving the basis makes loading exact everywhere.
The constructor still runs the SVD (with `energy` it decides r), so loading costs one SVD per layer.

Apply-time cost (2 CPU cores, noisy): a float64 SVD of a 576 x 1536 weight takes ~0.13 s when the
cores are free, so every linear layer of a 135M-parameter model (SmolLM-135M: 210 matrices) takes
~15 s. On oversubscribed cores LAPACK's threads can slow this 10-100x (measured 0.9 s with one
thread, 18 s with two at a load of 10); OMP_NUM_THREADS=1 helps there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.registry import register
from .diagonal_basis import DiagonalBasisLayer


@dataclass
class SVFitConfig(AdapterConfig):
    """Train the top-r singular values of each adapted weight; singular vectors and residual frozen."""

    method = "svfit"
    paper: ClassVar[str] = "Sun et al. 2024, arXiv:2409.05926"
    trainable: ClassVar[str] = "r per layer"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); every linear layer but the head by default."""

    r: int | None = None
    """Number of singular values trained per layer; None chooses it per layer from `energy`."""

    energy: float = 0.99
    """With r=None: keep the fewest top singular values with sum s_i^2 / sum s^2 >= energy, in (0, 1]."""

    def validate(self) -> None:
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1):
            raise ConfigError(f"SVFit r must be a positive integer or None (choose r by energy), got r={self.r!r}")
        if not isinstance(self.energy, (int, float)) or not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"SVFit energy must be in (0, 1] (the share of sum s_i^2 to keep), got {self.energy!r}")


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r with sum_{i<=r} s_i^2 / sum_i s_i^2 >= energy (singular values sorted descending)."""
    power = singular_values.double().pow(2).cumsum(0)
    if power[-1] <= 0:
        return 1  # a zero weight has no energy to keep
    share = power / power[-1]  # exactly 1.0 at the end, so some r always qualifies
    return int((share < energy).sum()) + 1


class SVFitLinear(DiagonalBasisLayer):
    """SVFit on nn.Linear and GPT-2 Conv1D: basis_out = U_r, basis_in = V_r^T, sigma0 = S_r."""

    def __init__(self, base: nn.Module, r: int | None, energy: float, name: str = "") -> None:
        d_in, d_out = weights.in_out_features(base)
        if r is not None and r > min(d_in, d_out):
            raise ConfigError(f"SVFit r={r} is larger than min(d_in, d_out) = {min(d_in, d_out)} of "
                              f"{name or 'a layer'} (d_out x d_in = {d_out} x {d_in}); use r <= {min(d_in, d_out)} "
                              "or r=None to choose r by energy")
        u, s, vh = torch.linalg.svd(weights.get_weight(base).double(), full_matrices=False)  # W0 = U S V^T
        rank = energy_rank(s, energy) if r is None else r
        super().__init__(base, rank)
        self.register_buffer("sigma0", torch.zeros(rank, **self.factor_kwargs))
        self.sigma = nn.Parameter(torch.zeros(rank, **self.factor_kwargs))
        with torch.no_grad():  # the basis is structure, fixed by the base (reset_parameters does not redo it)
            self.basis_out.copy_(u[:, :rank])
            self.basis_in.copy_(vh[:rank])
            self.sigma0.copy_(s[:rank])

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.sigma.copy_(self.sigma0)  # sigma' = diag(S_r): the same fp32 values, so e = 0 exactly

    def diagonal(self) -> torch.Tensor:
        return self.sigma - self.sigma0


@register(SVFitConfig)
def build(module: nn.Module, cfg: SVFitConfig, name: str) -> SVFitLinear | None:
    """SVFit wraps linear layers (nn.Linear, GPT-2 Conv1D) only."""
    if not weights.is_linear(module):
        return None
    return SVFitLinear(module, cfg.r, cfg.energy, name)
