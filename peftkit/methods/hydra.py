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
  Default targets are the paper's: each block's attention output and MLP down projection, as roles
  resolved per architecture (`core.architectures`: Llama `o_proj`, GPT-NeoX `attention.dense`, BERT
  `attention.output.dense`, timm ViT `attn.proj` ...).

Forward: the sequential branch reads h = W0 x + b0, so A_s h + a_s = (A_s W0) x + (a_s + A_s b0) and
both branches are one low-rank update of x with stacked factors A = [A_p; A_s W0] (r + r_s, d_in),
B = [B_p, B_s]: LoRA's in-place kernel (`lowrank.add_low_rank`) with rank r + r_s. A_s W0 costs
r_s d_out d_in per step (no token dimension) and autograd carries the gradients back through the
stacking; backward keeps x and a (tokens, r + r_s) tensor, like LoRA, and never saves h. On the
16.8M-parameter benchmark Llama (all 7 projections, r = r_s = 8, CPU time, 1 thread, interleaved,
noisy): 1.15x the floor step, LoRA r16 1.14x (1.27x with two branch Functions and a saved h);
peak memory within noise of LoRA r16's.
"""

from __future__ import annotations

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
from .lowrank import add_low_rank, apply_in_place

# The paper adapts the attention output and MLP down projections (timm ViT: attn.proj, mlp.fc2).
DEFAULT_TARGETS = ["role:attn-out", "role:mlp-down"]


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


class BiasedLowRankAdd(torch.autograd.Function):
    """y + s (B dropout(A x + a) + c) added into y in place: the dropout/bias form of `LowRankAdd`.

    Backward saves x, the (tokens, rank) activation after dropout and the scaled keep-mask.
    """

    @staticmethod
    def forward(ctx, y, x, down, down_bias, up, up_bias, scaling: float, p: float):
        hid = torch.addmm(down_bias, x.reshape(-1, x.shape[-1]), down.t())  # (tokens, rank)
        mask = torch.empty_like(hid).bernoulli_(1 - p).div_(1 - p)
        hid *= mask
        y2 = y.view(-1, y.shape[-1])  # (tokens, d_out)
        y2.addmm_(hid, up.t(), alpha=scaling).add_(up_bias, alpha=scaling)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, hid, mask, down, up)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, hid, mask, down, up = ctx.saved_tensors
        need = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])  # (tokens, d_out)
        d_pre = (g2 @ up).mul_(mask).mul_(ctx.scaling)  # (tokens, rank): gradient at A x + a
        dx = (d_pre @ down).view(x.shape) if need[1] else None
        d_down = d_pre.t() @ x.reshape(-1, x.shape[-1]) if need[2] else None  # (rank, d_in)
        d_up = (hid.t() @ g2).mul_(ctx.scaling).t() if need[4] else None  # (d_out, rank)
        d_down_bias = d_pre.sum(0) if need[3] else None
        d_up_bias = g2.sum(0).mul_(ctx.scaling) if need[5] else None
        return grad, dx, d_down, d_down_bias, d_up, d_up_bias, None, None


def biased_low_rank_reference(y, x, down, down_bias, up, up_bias, scaling: float, p: float) -> torch.Tensor:
    """y + s (B dropout(A x + a) + c) in plain autograd (one dtype). What `BiasedLowRankAdd` adds into y in
    place; its dropout draws the same random numbers, so under one seed the two agree."""
    return y + scaling * F.linear(F.dropout(F.linear(x, down, down_bias), p), up, up_bias)


def add_biased_low_rank(y, x, down, down_bias, up, up_bias, scaling: float, p: float) -> torch.Tensor:
    """y + s (B dropout(A x + a) + c): in place when dtypes agree (or under autocast), else out of place."""
    device = x.device.type
    factors = (down, down_bias, up, up_bias)
    if torch.is_autocast_enabled(device) and y.dtype == torch.get_autocast_dtype(device) and y.is_contiguous():
        with torch.autocast(device, enabled=False):
            cast = [t.to(y.dtype) for t in factors]
            return apply_in_place(BiasedLowRankAdd, y, x.to(y.dtype), *cast, scaling, p)
    if x.dtype == y.dtype == down.dtype and y.is_contiguous() and not torch.is_autocast_enabled(device):
        return apply_in_place(BiasedLowRankAdd, y, x, *factors, scaling, p)
    hid = F.dropout(F.linear(x.to(down.dtype), down, down_bias), p)  # (..., rank)
    return y + (scaling * F.linear(hid, up, up_bias)).to(y.dtype)


def _times(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w in a's dtype; a low-precision base weight is multiplied in its own dtype (no fp32 copy of it)."""
    return a @ w if a.dtype == w.dtype else (a.to(w.dtype) @ w).to(a.dtype)


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

    def stacked(self) -> tuple:
        """Both branches as one low-rank update of x: A_s h + a_s = (A_s W0) x + (a_s + A_s b0), so

        A = [A_p; A_s W0], a = [a_p; a_s + A_s b0], B = [B_p, B_s], c = c_p + c_s (a, c None without a bias).
        Built with autograd each step (r_s d_out d_in work, no token dimension).
        """
        a_p, bias_p, b_p, c_p = self.branch("par")
        a_s, bias_s, b_s, c_s = self.branch("seq")
        w0, b0 = weights.get_weight(self.base), weights.get_bias(self.base)
        down = torch.cat([a_p, _times(a_s, w0)])  # (r + r_s, d_in)
        up = torch.cat([b_p, b_s], dim=1)  # (d_out, r + r_s)
        if bias_p is None:
            return down, None, up, None
        return down, torch.cat([bias_p, bias_s + _times(a_s, b0)]), up, c_p + c_s

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        down, down_bias, up, up_bias = self.stacked()
        p = self.dropout if self.training else 0.0
        if p > 0:  # the biases sit inside the dropout: they are masked per token
            if down_bias is None:
                down_bias, up_bias = down.new_zeros(down.shape[0]), up.new_zeros(up.shape[0])
            return add_biased_low_rank(y, x, down, down_bias, up, up_bias, self.scaling, p)
        # one rank r + r_s update of the base output, in place (see lowrank.add_low_rank)
        y = add_low_rank(y, x, down, up, self.scaling)
        if down_bias is None:
            return y
        return y.add_((self.scaling * (up @ down_bias + up_bias)).to(y.dtype))  # B a + c: one vector

    # --- merging -----------------------------------------------------------------------------
    def _factors(self, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
        return {n: None if t is None else t.detach().to(dtype)
                for n, t in zip(("Ap", "ap", "Bp", "cp", "As", "as", "Bs", "cs"),
                                self.branch("par") + self.branch("seq"), strict=True)}

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        f, s = self._factors(weight.dtype), self.scaling
        return weight + s * (f["Bp"] @ f["Ap"] + f["Bs"] @ (f["As"] @ weight))

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None:  # a bias-free base has bias-free branches: nothing to fold
            return None
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
