"""DiffuseKronA: Kronecker-product adapters (Marjit et al., 2024, arXiv:2402.17412).

    y = W0 x + b0 + alpha * (A kron B) x,    A in R^{a1 x a2}, B in R^{b1 x b2},
    a1 b1 = d_out, a2 b2 = d_in,

with `torch.kron` ordering: (A kron B)[i b1 + l, j b2 + k] = A[i, j] B[l, k]. Trainable per layer:
a1 a2 + b1 b2, while rank(A kron B) = rank(A) rank(B) can reach min(d_in, d_out): a full-rank update
for a few hundred parameters where LoRA of that rank needs r (d_in + d_out).

Init (the reference code): A ~ N(0, 1/a1^2), B = 0, so the model is unchanged at init.

Forward without forming the (d_out, d_in) product (`KronAdd`): per token, X = x.reshape(a2, b2)
(row-major), Y = A X B^T (a1, b1), delta_y = alpha * Y.reshape(d_out), added into the base output in
place; backward saves only x (which the base layer keeps anyway) and the two factors.

Choices:

* Row order. The reference's 3-D path reshapes x as (b2, a2) and returns rows in (b1, a1) order, i.e.
  a fixed row permutation of (A kron B) x (methods.md 2.9, checked there numerically). Here the
  ordering is plain `torch.kron`, so `delta_weight()` is exactly `alpha * torch.kron(A, B)` and peft's
  LoKr (w1 kron w2) holds the same tensors.
* Factor sizes. The reference uses a1=64, a2=8 on Stable Diffusion's UNet, which does not divide most
  language-model widths. By default (a1, a2 unset) each is picked per layer from its dimension by
  LyCORIS / peft LoKr's `factorization(d, factor)`: factor=-1, the largest divisor <= sqrt(d) (A gets
  the smaller factor, B the larger; 384 -> 16 x 24, 1024 -> 32 x 32); factor=f > 0, f itself when it
  divides d, else the largest divisor <= min(f, sqrt(d)). Setting a1 / a2 fixes them for every layer;
  one that does not divide a layer's dimension raises a ConfigError at apply time.
* Scale. `alpha` multiplies the update (the reference's optional network_alpha, unused by default: 1).

peft interop: a LoKr adapter (peft_type "LOKR") with undecomposed w1, w2 of these shapes is the same
update with scaling alpha_peft / r_peft; peftkit reads such files (w1 -> A, w2 -> B) and exports to
them when a single peft `decompose_factor` reproduces every layer's factor shapes (nn.Linear only: peft's
LoKr has no GPT-2 Conv1D layer). peft decomposes w2 into two low-rank factors when r < max(b1, b2) / 2;
such files do not fit a DiffuseKronA layer and are refused with the missing / unexpected keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.layer import AdapterLayer
from ..core.registry import register
from .lora import adapter_dtype
from .lowrank import apply_in_place


def factor_pair(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, dim // m) as LyCORIS / peft LoKr's `factorization(dim, factor)` picks it (see module docstring)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = math.isqrt(dim) if factor < 0 else min(factor, math.isqrt(dim))
    m = max(d for d in range(1, limit + 1) if dim % d == 0)
    return m, dim // m


@dataclass
class DiffuseKronAConfig(AdapterConfig):
    """DiffuseKronA: a Kronecker product of two small trainable factors as the weight update."""

    method = "diffusekrona"
    paper: ClassVar[str] = "Marjit et al. 2024, arXiv:2402.17412"
    trainable: ClassVar[str] = "a1 a2 + b1 b2 per layer (a1 b1 = d_out, a2 b2 = d_in)"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); linear layers (nn.Linear, GPT-2 Conv1D) only."""

    a1: int | None = None
    """Rows of A, dividing every adapted d_out (the reference's rank[0], 64 on SD); None: from `factor`."""

    a2: int | None = None
    """Columns of A, dividing every adapted d_in (the reference's rank[1], 8 on SD); None: from `factor`."""

    factor: int = -1
    """How unset a1 / a2 are chosen per layer: -1, the divisor of the dimension closest to (at most)
    its square root; f > 0, f when it divides the dimension (else the largest divisor <= min(f, sqrt))."""

    alpha: float = 1.0
    """Scale of the update: delta W = alpha * (A kron B)."""

    def validate(self) -> None:
        for name in ("a1", "a2"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"DiffuseKronA {name} must be a positive integer or None (picked from `factor`), "
                                  f"got {value!r}")
        if not isinstance(self.factor, int) or (self.factor < 1 and self.factor != -1):
            raise ConfigError(f"DiffuseKronA factor must be -1 (closest to the square root) or a positive integer, "
                              f"got {self.factor!r}")

    def shapes_for(self, d_out: int, d_in: int) -> tuple[int, int]:
        """(a1, a2) of a (d_out, d_in) layer."""
        a1 = self.a1 if self.a1 is not None else factor_pair(d_out, self.factor)[0]
        a2 = self.a2 if self.a2 is not None else factor_pair(d_in, self.factor)[0]
        return a1, a2


class KronAdd(torch.autograd.Function):
    """y += s (A kron B) x, computed per token as s A X_t B^T and added into the base output y in place.

    X_t is token t's input as an (a2, b2) matrix. The B-side products run as one plain GEMM over all
    tokens ((tokens a2, b2) rows); the A-side ones, which contract the middle axis, as a batched GEMM
    over tokens with A broadcast (stride 0), whose (tokens, a1, b1) result is y's own layout: no
    transposed copy of an activation-sized tensor in either direction, and the forward's batched GEMM
    accumulates straight into y. Backward, with P_t = G_t B: dX_t = s A^T P_t, dA = s sum_t P_t X_t^T,
    dB = s sum_t (A^T G_t)^T X_t (one GEMM over (tokens a2) rows); s scales the small factor, never an
    activation. Per layer at 1024 tokens, 2 threads, forward + backward: 2.6 -> 1.5 ms (384 x 384),
    4.7 -> 3.1 ms (384 -> 1024), 4.3 -> 2.9 ms (1024 -> 384) against the transposed-copy version
    (NOTES 10). Math in the factors' dtype; y keeps its own (a bf16 base with fp32 factors is fine).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float):
        (a1, a2), (b1, b2) = a.shape, b.shape
        xs = x.reshape(-1, b2).to(a.dtype)  # (tokens a2, b2)
        tokens = xs.shape[0] // a2
        z = (xs @ b.t()).view(tokens, a2, b1)  # Z_t = X_t B^T
        yv = y.view(tokens, a1, b1)
        if y.dtype == a.dtype:
            yv.baddbmm_(a.expand(tokens, a1, a2), z, alpha=scaling)
        else:
            yv.add_(torch.matmul(a, z).to(y.dtype), alpha=scaling)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, a, b)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b = ctx.saved_tensors
        (a1, a2), (b1, b2) = a.shape, b.shape
        wants_x, wants_a, wants_b = ctx.needs_input_grad[1:4]
        g = grad.reshape(-1, a1, b1).to(a.dtype)  # (tokens, a1, b1)
        tokens = g.shape[0]
        xs = x.reshape(tokens, a2, b2).to(a.dtype)
        sat = (a * ctx.scaling).t().expand(tokens, a2, a1)  # s A^T for every token
        dx = da = db = None
        if wants_x or wants_a:
            p = (g.reshape(-1, b1) @ b).view(tokens, a1, b2)  # P_t = G_t B
            if wants_a:  # a (tokens, a1, a2) partial product, summed: small next to P
                da = torch.bmm(p, xs.transpose(1, 2)).sum(0).mul_(ctx.scaling)
            if wants_x:
                dx = torch.bmm(sat, p).view(x.shape).to(x.dtype)
            del p  # freed before the next activation-sized temporary: a lower peak in backward
        if wants_b:
            h = torch.bmm(sat, g)  # s A^T G_t, (tokens, a2, b1)
            db = h.reshape(-1, b1).t() @ xs.reshape(-1, b2)
        return grad, dx, da, db, None


def kron_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """y + s (A kron B) x with the Kronecker product formed by autograd (one dtype). What `KronAdd` computes."""
    return y + scaling * (x @ torch.kron(a, b).T)


def add_kron(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """y + s (A kron B) x for a base output y (..., d_out) and input x (..., d_in)."""
    device = x.device.type
    if not y.is_contiguous():
        y = y.contiguous()
    if torch.is_autocast_enabled(device):  # the small GEMMs run in the factors' dtype, autocast off
        with torch.autocast(device, enabled=False):
            return apply_in_place(KronAdd, y, x, a, b, scaling)
    return apply_in_place(KronAdd, y, x, a, b, scaling)


class KroneckerLinear(AdapterLayer):
    """DiffuseKronA on nn.Linear and GPT-2 Conv1D."""

    def __init__(self, base: nn.Module, a1: int, a2: int, alpha: float, name: str = "") -> None:
        super().__init__(base)
        w = weights.get_weight(base)
        self.d_out, self.d_in = w.shape
        if self.d_out % a1 or self.d_in % a2:
            raise ConfigError(
                f"DiffuseKronA factors a1={a1}, a2={a2} do not divide {name or 'the layer'}'s (d_out, d_in) = "
                f"({self.d_out}, {self.d_in}); a1 must divide d_out and a2 d_in (divisors of d_out: "
                f"{_divisors(self.d_out)}; of d_in: {_divisors(self.d_in)}), or leave a1 / a2 unset to pick them "
                "per layer from `factor`")
        self.scaling = alpha
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.kron_A = nn.Parameter(torch.zeros(a1, a2, **kw))
        self.kron_B = nn.Parameter(torch.zeros(self.d_out // a1, self.d_in // a2, **kw))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.kron_A, std=1.0 / self.kron_A.shape[0])
            nn.init.zeros_(self.kron_B)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * torch.kron(self.kron_A, self.kron_B)

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return add_kron(y, x, self.kron_A, self.kron_B, self.scaling)

    def extra_repr(self) -> str:
        return f"A={tuple(self.kron_A.shape)}, B={tuple(self.kron_B.shape)}, alpha={self.scaling:g}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@register(DiffuseKronAConfig)
def build(module: nn.Module, cfg: DiffuseKronAConfig, name: str) -> KroneckerLinear | None:
    """DiffuseKronA wraps linear layers only; other matched modules are left alone."""
    if not weights.is_linear(module):
        return None
    d_in, d_out = weights.in_out_features(module)
    return KroneckerLinear(module, *cfg.shapes_for(d_out, d_in), cfg.alpha, name)
