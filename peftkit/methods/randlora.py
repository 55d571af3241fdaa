"""RandLoRA: full-rank updates from fixed random bases (Albert et al., 2025, arXiv:2502.00987).

For a layer with d_min = min(d_in, d_out), d_max = max(d_in, d_out) and N = ceil(d_min / r) bases:

    A_hat[k, n, :] = Lambda[k, n] * A[k, :] * Gamma[n, :]            (r, N, d_min)
    core  = B_flat A_flat,   B_flat = B[:d_max, :N].flatten(1)       (d_max, N r), columns in (n, k) order
                             A_flat = A_hat.flatten(0, 1)            (r N, d_min), rows in (k, n) order
    y = W0 x + b0 + (alpha / r) * delta x,   delta = core when d_in is the smaller side, else core^T.

A (r, 1, d_min) and B (d_max, N, r) are frozen random bases shared by every adapted layer: ONE pair per
model, drawn from `seed` for the largest (d_out, d_in) among the adapted layers, each layer slicing its
corner (so a layer's bases are views, not copies). They are regenerated from the seed, never saved.
Trainable per layer: the diagonals Lambda (r x N, init 0: identity at init) and Gamma (N x d_min, init
1 / max(N, d_min)), i.e. r N + N d_min = N (r + d_min).

Matching Hugging Face peft 0.21.2 (`tuners/randlora`), whose files load here and back:

* methods.md writes A as (r, N, d_min); peft draws ONE A (r, 1, d_min) broadcast over the N bases, and
  pairs the two flattenings above as they come (column c of B_flat with row c of A_flat). peftkit does
  exactly what peft does, since equal outputs on shared files are the contract;
* the dense bases are kaiming-uniform draws in bfloat16 (peft's dtype wherever bf16 is available, which
  includes every CPU), A first, then B in N chunks of (d_max, 1, r), each divided by its std; the
  "sparse" / "very_sparse" bases are ternary {-1, 0, 1} / std from `torch.rand` in float32, with
  P(-1) = P(1) = 1/6 and 1 / (2 sqrt(d_min)) respectively. peft files carry the bases when saved with
  save_projection=True: on load they must equal the regenerated ones (checked, then dropped); the export
  writes them once (peft's top-level keys), so peft never has to redraw them.

Forward (choice, for speed): the update is full rank, so a product form costs two GEMMs as large as the
base layer's in forward and three in backward. Instead `RandLoRAFunction` builds W = W0 + s delta (one
(d_max x N r x d_min) GEMM, independent of the batch), runs ONE linear with it in place of the base, and
in backward takes dL/dW = g^T x once, from which dLambda and dGamma follow through B_flat^T. Only x and
the small diagonals are saved; W is rebuilt in backward rather than kept (no weight-sized tensor per
layer lives between forward and backward). With dropout > 0 in training, the update path sees a dropped
input, so that case runs base(x) + s delta dropout(x) through plain autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.layer import AdapterLayer
from ..core.model_adapter import ModelAdapter
from ..core.registry import register, register_model_adapter
from .lora import adapter_dtype


@dataclass
class RandLoRAConfig(AdapterConfig):
    """RandLoRA: trainable diagonal scalings of shared, seeded random bases; full-rank updates."""

    method = "randlora"
    paper: ClassVar[str] = "Albert et al. 2025, arXiv:2502.00987"
    trainable: ClassVar[str] = "N (r + d_min) per layer, N = ceil(d_min / r)"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); linear layers (nn.Linear, GPT-2 Conv1D) only."""

    r: int = 32
    """Rank of each random basis; a layer uses N = ceil(d_min / r) of them (smaller r: more parameters)."""

    alpha: float = 640.0
    """Scale numerator: the update is multiplied by alpha / r (peft's default 640, about 20 r)."""

    dropout: float = 0.0
    """Dropout probability on the input of the update path."""

    seed: int = 0
    """Seed the shared random bases are drawn from (peft's projection_prng_key)."""

    bases: str = "dense"
    """Random bases: "dense" (kaiming-uniform), "sparse" (ternary, 2/3 zeros) or "very_sparse"
    (ternary, 1 - 1/sqrt(d_min) zeros), as peft's sparse / very_sparse options."""

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"RandLoRA r must be a positive integer (the rank of each random basis), got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.bases not in BASES:
            raise ConfigError(f"unknown RandLoRA bases {self.bases!r}; choose one of {', '.join(BASES)}")


# --- the shared random bases: drawn from the seed, never saved ---------------------------------
def _kaiming_bf16(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=generator)


def _dense(generator: torch.Generator, r: int, n: int, d_min: int, d_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = _kaiming_bf16((r, 1, d_min), generator)
    b = torch.cat([_kaiming_bf16((d_max, 1, r), generator) for _ in range(n)], dim=1)
    return a / a.std(), b / b.std()


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    """-1 below 1/(2 s), +1 above 1 - 1/(2 s), 0 between; divided by the std."""
    t = (uniform > 1 - 1 / (2 * sparsity)).float() - (uniform < 1 / (2 * sparsity)).float()
    return t / t.std()


def _sparse_with(sparsity: Callable[[int], float]) -> Callable:
    def draw(generator: torch.Generator, r: int, n: int, d_min: int, d_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.rand((r, 1, d_min), generator=generator)
        b = torch.rand((d_max, n, r), generator=generator)
        return _ternary(a, sparsity(d_min)), _ternary(b, sparsity(d_min))

    return draw


BASES: dict[str, Callable] = {
    "dense": _dense,
    "sparse": _sparse_with(lambda d_min: 3.0),
    "very_sparse": _sparse_with(math.sqrt),
}
"""Basis kind -> draw(generator, r, N, d_min, d_max) -> (A (r, 1, d_min), B (d_max, N, r))."""


class RandomBases(nn.Module):
    """The model-wide bases A (r, 1, d_min) and B (d_max, N, r), a submodule shared by every RandLoRA layer.

    Shared as one module object, so `model.to(device)` moves one copy (a tensor registered in each layer
    would be copied per layer). Non-persistent buffers: never in a state dict or an adapter file.
    """

    def __init__(self, kind: str, seed: int, r: int, d_out: int, d_in: int, device: torch.device) -> None:
        super().__init__()
        self.kind, self.seed, self.r = kind, seed, r
        self.d_min, self.d_max = min(d_out, d_in), max(d_out, d_in)
        self.num_bases = -(-self.d_min // r)
        a, b = self.draw()
        self.register_buffer("a", a.to(device), persistent=False)
        self.register_buffer("b", b.to(device), persistent=False)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in float32, drawn on the CPU from the seed as peft does."""
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        a, b = BASES[self.kind](generator, self.r, self.num_bases, self.d_min, self.d_max)
        return a.float(), b.float()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in float32; drawn again when the model was cast (a bf16 copy of the sparse bases is inexact)."""
        if self.a.dtype != torch.float32:
            a, b = self.draw()
            self.a, self.b = a.to(self.a.device), b.to(self.b.device)
        return self.a, self.b

    def extra_repr(self) -> str:
        return f"{self.kind}, seed={self.seed}, A=(r={self.r}, 1, {self.d_min}), B=({self.d_max}, {self.num_bases}, r)"


# --- the update ----------------------------------------------------------------------------------
def scaled_rows(a: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
    """A_flat: Lambda[k, n] * A[k, :] * Gamma[n, :] flattened to (r N, d_min), rows in (k, n) order."""
    return (lam[:, :, None] * a[:, None, :] * gam[None]).flatten(0, 1)


def effective_weight(w0: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scaling: float, transposed: bool,
                     dtype: torch.dtype) -> torch.Tensor:
    """W0 + s delta in the canonical (d_out, d_in) layout, summed in the adapter's precision, returned in `dtype`."""
    w0 = w0.to(v.dtype)
    w = torch.addmm(w0, v.t(), u.t(), alpha=scaling) if transposed else torch.addmm(w0, u, v, alpha=scaling)
    return w.to(dtype)


class RandLoRAFunction(torch.autograd.Function):
    """y = x (W0 + s delta)^T + b as one linear; backward rebuilds W and takes dL/dW = g^T x once.

    Saved: x (which the base layer would save anyway), the diagonals, and references to the frozen base
    weight and bases. dLambda, dGamma: with dA_flat = s B_flat^T dcore (dcore = dW, or dW^T when the
    update is transposed), viewed (r, N, d_min): dLambda[k, n] = sum_j dA[k, n, j] A[k, j] Gamma[n, j] and
    dGamma[n, j] = sum_k dA[k, n, j] Lambda[k, n] A[k, j].
    """

    @staticmethod
    def forward(ctx, x, lam, gam, bias, w0, u, a, scaling: float, transposed: bool):
        w = effective_weight(w0, u, scaled_rows(a, lam, gam), scaling, transposed, x.dtype)
        ctx.save_for_backward(x, lam, gam, w0, u, a)
        ctx.scaling, ctx.transposed = scaling, transposed
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, lam, gam, w0, u, a = ctx.saved_tensors
        s, transposed = ctx.scaling, ctx.transposed
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (tokens, d_out), (tokens, d_in)
        v = scaled_rows(a, lam, gam)  # (r N, d_min)
        dx = dlam = dgam = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ effective_weight(w0, u, v, s, transposed, grad.dtype)).view(x.shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw = (g2.t() @ x2).to(v.dtype)  # (d_out, d_in)
            dv = (dw @ u).t() if transposed else u.t() @ dw  # (N r, d_min)
            dv = dv.reshape(lam.shape[0], lam.shape[1], -1).mul_(s) * a[:, None, :]  # dA_hat * A, (r, N, d_min)
            dlam = (dv * gam[None]).sum(-1)
            dgam = (dv * lam[:, :, None]).sum(0)
        if ctx.needs_input_grad[3]:
            dbias = g2.sum(0)
        return dx, dlam, dgam, dbias, None, None, None, None, None


def randlora_reference(x, lam, gam, bias, w0, u, a, scaling: float, transposed: bool) -> torch.Tensor:
    """y = x (W0 + s delta)^T + b, delta = B_flat A_flat (its transpose when d_in > d_out), formed by autograd
    (one dtype for all tensors). What `RandLoRAFunction` computes."""
    core = u @ scaled_rows(a, lam, gam)  # (d_max, d_min)
    return F.linear(x, w0 + scaling * (core.t() if transposed else core), bias)


class RandLoRALinear(AdapterLayer):
    """RandLoRA on nn.Linear and GPT-2 Conv1D; the bases arrive from `SharedBases` (they depend on all layers)."""

    def __init__(self, base: nn.Module, cfg: RandLoRAConfig) -> None:
        super().__init__(base)
        w = weights.get_weight(base)
        self.d_out, self.d_in = w.shape
        self.d_min, self.d_max = min(w.shape), max(w.shape)
        self.r, self.scaling, self.kind, self.seed = cfg.r, cfg.alpha / cfg.r, cfg.bases, cfg.seed
        self.num_bases = -(-self.d_min // cfg.r)
        self.transposed = self.d_in > self.d_out  # the smaller side gets A_flat (peft's layout)
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.randlora_lambda = nn.Parameter(torch.zeros(cfg.r, self.num_bases, **kw))
        self.randlora_gamma = nn.Parameter(torch.zeros(self.num_bases, self.d_min, **kw))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.bases: RandomBases | None = None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.randlora_lambda.zero_()
            self.randlora_gamma.fill_(1.0 / max(self.randlora_gamma.shape))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's views of the shared bases: B_flat (d_max, N r) and A (r, d_min)."""
        if self.bases is None:
            raise RuntimeError("RandLoRA layer has no bases; create it with peftkit.apply, which shares them")
        a, b = (t.to(self.randlora_lambda.dtype) for t in self.bases.tensors())  # no copy unless float64
        u = b.view(b.shape[0], -1)[: self.d_max, : self.num_bases * self.r]  # == B[:d_max, :N].flatten(1)
        return u, a[:, 0, : self.d_min]

    def delta_weight(self) -> torch.Tensor:
        u, a = self.factors()
        core = u @ scaled_rows(a, self.randlora_lambda, self.randlora_gamma)  # (d_max, d_min)
        return self.scaling * (core.t() if self.transposed else core)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.stacked() or (self.training and isinstance(self.dropout, nn.Dropout)):  # the kernel reads W itself
            y = self.base(x, *args, **kwargs)
            delta = self.delta_weight()
            return y + F.linear(self.dropout(x).to(delta.dtype), delta).to(y.dtype)
        u, a = self.factors()
        inputs = (self.randlora_lambda, self.randlora_gamma, self.bias, weights.get_weight(self.base), u, a,
                  self.scaling, self.transposed)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # W is summed in fp32 and cast once, as autocast would cast it
            with torch.autocast(device, enabled=False):
                return RandLoRAFunction.apply(x.to(torch.get_autocast_dtype(device)), *inputs)
        return RandLoRAFunction.apply(x, *inputs)

    def extra_repr(self) -> str:
        return f"r={self.r}, bases={self.num_bases}, scaling={self.scaling:g}"


@register_model_adapter(RandLoRAConfig)
class SharedBases(ModelAdapter):
    """Draws the random bases once per adapter, sized for its largest layer, and gives every layer views of them."""

    def attach(self, model: nn.Module, layers: dict) -> None:
        super().attach(model, layers)
        mine = list(layers.values())
        first = mine[0]
        bases = RandomBases(first.kind, first.seed, first.r, max(m.d_out for m in mine), max(m.d_in for m in mine),
                            first.randlora_lambda.device)
        for layer in mine:
            layer.bases = bases


@register(RandLoRAConfig)
def build(module: nn.Module, cfg: RandLoRAConfig, name: str) -> RandLoRALinear | None:
    """RandLoRA wraps linear layers only; other matched modules are left alone."""
    if not weights.is_linear(module):
        return None
    return RandLoRALinear(module, cfg)
