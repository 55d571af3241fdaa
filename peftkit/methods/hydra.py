"""Hydra: parallel plus sequential low-rank branches (Kim, Yang, Kim, Hong & Park, 2023, arXiv:2309.06922).

    h = W0 x + b0,      y = h + s F_par(x) + s F_seq(h),      F(u) = B dropout(A u + a) + c

The parallel branch is LoRA on the layer input (A_p: r x d_in); the sequential branch is a learned
linear combination of the pre-trained features, on the layer output (A_s: r_s x d_out). Both B_* are
d_out x rank. Init (reference `vtab1k/hydra.py`): A xavier-uniform, a = B = c = 0, so the model is
unchanged at init. Dropout is the identity at inference, and the adapter folds into the layer:

    W = W0 + s (B_p A_p + B_s A_s W0)
    b = b0 + s (B_p a_p + c_p) + s (B_s A_s b0 + B_s a_s + c_s)

(The reference's `set_hydraWeight` folds the attention projection with the MLP's fc2 weights; that
is a bug and not reproduced: the tests check the fold against the two-branch forward.) Unmerge
inverts it exactly: W0 = (I + s B_s A_s)^{-1} (W - s B_p A_p), by Woodbury through an r_s x r_s
solve; a singular I + s A_s B_s raises MergeError.

Trainable per layer: r (d_in + d_out) + 2 r_s d_out, plus r + r_s + 2 d_out for the biases a, c.

Choices (the spec leaves them open):
* Branch biases a, c exist only when the base layer has a bias. The VTAB code puts biased branches on
  biased ViT projections; the authors' NLU code (`nlu/.../adapter.py`) uses bias-free branches. On a
  bias-free base the constant s (B a + c) would have nowhere to go when merging, so it is left out.
* Defaults r = 8, s = 1, dropout 0 are the reference layer's own defaults (`Hydra_layer`); its VTAB-1k
  runs use r = 2, s = 0.1, dropout 0.2 (tuned for 1k examples), the NLU scripts r = 4 and r_s = 8.
  Default targets are the paper's: each block's attention output and MLP down projection.

Forward: the sequential branch must see h, and dL/dA_s = D^T h needs h in backward. Saving h would
keep one (tokens, d_out) tensor per layer; `BranchAdd` instead rebuilds D^T h = (D^T x) W0^T +
colsum(D) b0^T from x (saved anyway) and the frozen W0: r x d_in x d_out work with no token
dimension. So both branches add into h in place and keep only (tokens, rank) tensors, like LoRA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.layer import AdapterLayer, MergeError
from ..core.registry import register
from .lora import adapter_dtype
from .lowrank import add_low_rank

# The paper adapts the attention output and MLP down projections (timm ViT: attn.proj, mlp.fc2).
DEFAULT_TARGETS = ["o_proj", "down_proj", "output.dense", "c_proj", "out_proj", "proj", "fc2"]


@dataclass
class HydraConfig(AdapterConfig):
    """Hydra: a LoRA-like branch on the input plus a low-rank mix of the output features."""

    method = "hydra"
    paper: ClassVar[str] = "Kim et al. 2023, arXiv:2309.06922"
    trainable: ClassVar[str] = "r (d_in + d_out) + 2 r_s d_out per layer (+ r + r_s + 2 d_out with a bias)"

    targets: str | list[str] | None = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Modules to adapt: attention output and MLP down projections by default (the paper's choice)."""

    r: int = 8
    """Rank of the parallel branch (the reference's `dim`)."""

    seq_r: int | None = None
    """Rank of the sequential branch; None means the same as r."""

    scaling: float = 1.0
    """s, multiplying both branches (the reference's `scale`)."""

    dropout: float = 0.0
    """Dropout probability between each branch's down and up projection."""

    def validate(self) -> None:
        for name in ("r", "seq_r"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"Hydra {name} must be a positive integer, got {name}={value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.scaling, int | float) or self.scaling != self.scaling:
            raise ConfigError(f"Hydra scaling must be a number, got {self.scaling!r}")


class BranchAdd(torch.autograd.Function):
    """y + s (B dropout(A u + a) + c), added into y in place; u = x, or u = y itself when `base` is given.

    Backward saves x, the (tokens, rank) branch activation and its dropout mask. For the sequential
    branch (u = h = base(x)) the gradient of A is rebuilt from x and the base weight, and the
    gradient reaching h is dL/dy + D A (D: the gradient at A u + a).
    """

    @staticmethod
    def forward(ctx, y, x, down, down_bias, up, up_bias, scaling: float, p: float, base: nn.Module | None):
        u = y if base is not None else x
        hid = u.reshape(-1, u.shape[-1]) @ down.t()  # (tokens, rank), computed before y changes
        if down_bias is not None:
            hid += down_bias
        mask = torch.empty_like(hid).bernoulli_(1 - p).div_(1 - p) if p > 0 else None
        if mask is not None:
            hid *= mask
        y2 = y.view(-1, y.shape[-1])  # (tokens, d_out)
        y2.addmm_(hid, up.t(), alpha=scaling)
        if up_bias is not None:
            y2.add_(up_bias, alpha=scaling)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, hid, mask, down, up)
        ctx.scaling, ctx.base = scaling, base
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, hid, mask, down, up = ctx.saved_tensors
        need = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])  # (tokens, d_out)
        d_hid = (g2 @ up).mul_(ctx.scaling)  # (tokens, rank)
        d_pre = d_hid if mask is None else d_hid.mul_(mask)
        d_up = (hid.t() @ g2).mul_(ctx.scaling).t() if need[4] else None  # (d_out, rank)
        d_up_bias = g2.sum(0).mul_(ctx.scaling) if need[5] else None
        d_down_bias = d_pre.sum(0) if need[3] else None
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, d_in)
        if ctx.base is None:
            d_down = d_pre.t() @ x2 if need[2] else None  # (rank, d_in)
            dx = (d_pre @ down).view(x.shape) if need[1] else None
            return grad, dx, d_down, d_down_bias, d_up, d_up_bias, None, None, None
        d_down = _grad_through_base(ctx.base, d_pre, x2).to(down.dtype) if need[2] else None  # (rank, d_out)
        dh = torch.addmm(g2, d_pre, down).view(grad.shape)  # dL/dh: direct, plus through A h
        return dh, None, d_down, d_down_bias, d_up, d_up_bias, None, None, None


def _grad_through_base(base: nn.Module, d_pre: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """D^T h for h = x W0^T + b0, without h: (D^T x) W0^T + colsum(D) b0^T, shape (rank, d_out)."""
    w0, b0 = weights.get_weight(base), weights.get_bias(base)
    dx_part = (d_pre.t().to(x2.dtype) @ x2).to(w0.dtype) @ w0.t()
    if b0 is not None:
        dx_part = dx_part + torch.outer(d_pre.sum(0).to(b0.dtype), b0)
    return dx_part


class HydraLinear(AdapterLayer):
    """Hydra on nn.Linear and GPT-2 Conv1D."""

    def __init__(self, base: nn.Module, r: int, seq_r: int, scaling: float, dropout: float) -> None:
        super().__init__(base)
        d_in, d_out = weights.in_out_features(base)
        w = weights.get_weight(base)
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.r, self.seq_r, self.scaling, self.dropout = r, seq_r, scaling, dropout
        with_bias = weights.get_bias(base) is not None
        for branch, rank, d_u in (("par", r, d_in), ("seq", seq_r, d_out)):
            shapes = {"down": (rank, d_u), "up": (d_out, rank), "down_bias": (rank,), "up_bias": (d_out,)}
            for part, shape in shapes.items():
                param = nn.Parameter(torch.zeros(shape, **kw)) if with_bias or "bias" not in part else None
                self.register_parameter(f"{branch}_{part}", param)

    def reset_parameters(self) -> None:
        for name, param in self.adapter_parameters().items():
            if name.endswith("_down"):
                nn.init.xavier_uniform_(param)
            else:
                nn.init.zeros_(param)

    def branch(self, name: str) -> tuple:
        """(A, a, B, c) of branch "par" or "seq" (a, c None without a base bias)."""
        return tuple(getattr(self, f"{name}_{part}") for part in ("down", "down_bias", "up", "up_bias"))

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        device = y.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else self.par_down.dtype
        if not (y.dtype == dtype and y.is_contiguous() and (autocast or x.dtype == dtype)):
            return self.reference_forward(x, y, p)  # mixed dtypes: out of place, as add_low_rank does
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            seq = [t if t is None else t.to(dtype) for t in self.branch("seq")]
            y = BranchAdd.apply(y, x, *seq, self.scaling, p, self.base)  # reads h before adding into it
            if p > 0:
                par = [t if t is None else t.to(dtype) for t in self.branch("par")]
                return BranchAdd.apply(y, x.to(dtype), *par, self.scaling, p, None)
        a, a_bias, b, b_bias = self.branch("par")
        y = add_low_rank(y, x, a, b, self.scaling)  # no dropout: B (A x + a) + c = B A x + (B a + c)
        if a_bias is not None:
            y = y.add_((self.scaling * (b @ a_bias + b_bias)).to(y.dtype))
        return y

    def reference_forward(self, x: torch.Tensor, h: torch.Tensor, p: float) -> torch.Tensor:
        """Out of place, plain autograd: mixed dtypes (a bf16 base with fp32 branches) and odd layouts."""
        out = h.to(self.par_down.dtype)
        for name, u in (("par", x), ("seq", h)):
            a, a_bias, b, b_bias = self.branch(name)
            hid = F.dropout(F.linear(u.to(a.dtype), a, a_bias), p, self.training)
            out = out + self.scaling * F.linear(hid, b, b_bias)
        return out.to(h.dtype)

    # --- merging -----------------------------------------------------------------------------
    def _factors(self, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
        return {n: None if t is None else t.detach().to(dtype)
                for n, t in zip(("Ap", "ap", "Bp", "cp", "As", "as", "Bs", "cs"),
                                self.branch("par") + self.branch("seq"), strict=True)}

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        f, s = self._factors(weight.dtype), self.scaling
        return weight + s * (f["Bp"] @ f["Ap"] + f["Bs"] @ (f["As"] @ weight))

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        f, s = self._factors(bias.dtype), self.scaling
        return bias + s * (f["Bs"] @ (f["As"] @ bias)) + self._bias_shift(f)

    def _bias_shift(self, f: dict) -> torch.Tensor:
        """s (B_p a_p + c_p + B_s a_s + c_s): the constant both branches add."""
        return self.scaling * (f["Bp"] @ f["ap"] + f["cp"] + f["Bs"] @ f["as"] + f["cs"])

    def _solve_seq(self, rhs: torch.Tensor) -> torch.Tensor:
        """(I + s B_s A_s)^{-1} rhs = rhs - s B_s (I + s A_s B_s)^{-1} A_s rhs, in float64."""
        f, s = self._factors(torch.float64), self.scaling
        small = torch.eye(self.seq_r, dtype=torch.float64, device=rhs.device) + s * f["As"] @ f["Bs"]
        cond = torch.linalg.cond(small)
        if not bool(torch.isfinite(cond)) or float(cond) > 1e12:
            raise MergeError("cannot unmerge Hydra: I + s B_s A_s is singular; the merged weights stay")
        return rhs - s * f["Bs"] @ torch.linalg.solve(small, f["As"] @ rhs)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        f = self._factors(torch.float64)
        rhs = weight.double() - self.scaling * f["Bp"] @ f["Ap"]
        return self._solve_seq(rhs).to(weight.dtype)

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        rhs = bias.double() - self._bias_shift(self._factors(torch.float64))
        return self._solve_seq(rhs[:, None])[:, 0].to(bias.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, seq_r={self.seq_r}, scaling={self.scaling:g}, dropout={self.dropout:g}"


@register(HydraConfig)
def build(module: nn.Module, cfg: HydraConfig, name: str) -> HydraLinear | None:
    """Wrap linear layers (nn.Linear, GPT-2 Conv1D); other matched modules are left alone."""
    if not weights.is_linear(module):
        return None
    return HydraLinear(module, cfg.r, cfg.seq_r or cfg.r, cfg.scaling, cfg.dropout)
