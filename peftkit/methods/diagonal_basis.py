"""A frozen rank-r basis with a trainable diagonal, the shared shape of SVFit and LoLDU:

    y = W0 x + b0 + B diag(e) A x,      A in R^{r x d_in}, B in R^{d_out x r} frozen, e in R^r.

SVFit: B = U_r, A = V_r^T, e = sigma' - sigma0 (svfit.py). LoLDU: B = P L_r, A = U_r (unit
diagonal), e = s z - s0 z0 (loldu.py). Both methods define their weight as a frozen residual plus a
trainable product, W = W_res + B diag(theta) A with W_res = W0 - B diag(theta0) A; written as the
untouched base plus the *change* of the product, W = W0 + B diag(theta - theta0) A, the two are equal,
and the change form keeps the base weight as it is (other code fingerprints it), needs no second
weight-sized buffer for W_res, and is the identity at init exactly (e = 0) instead of to SVD/LU
round-off. A and B are buffers of a rank-r LoRA's size; they are saved with the adapter (see the
method files for why).

`add_diagonal_low_rank` never builds a (d_out, d_in) matrix: per step it costs four (tokens x d x r)
GEMMs (two forward, two backward: dL/dx and the r-vector dL/de), against LoRA's six, and it saves only
the (tokens, r) projection h = x A^T for backward (the base layer saves x itself).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core import weights
from ..core.layer import AdapterLayer
from .lora import adapter_dtype
from .lowrank import apply_in_place


def add_diagonal_low_rank(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          e: torch.Tensor) -> torch.Tensor:
    """y + B diag(e) A x for a base output y (..., d_out), input x (..., d_in), A (r, d_in), B (d_out, r), e (r,).

    Computed in the factors' dtype (x is cast when it differs, e.g. a bf16 base with fp32 factors)
    and added into y in place. Under autocast the factors are cast to the autocast dtype first, as
    autocast itself would do for the matmuls.
    """
    device = x.device.type
    if not y.is_contiguous():
        y = y.contiguous()  # a copy, so the in-place add below never touches a strided view
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return apply_in_place(DiagonalLowRankAdd, y, x, a.to(dtype), b.to(dtype), e.to(dtype))
    return apply_in_place(DiagonalLowRankAdd, y, x, a, b, e)


class DiagonalLowRankAdd(torch.autograd.Function):
    """y += (h * e) B^T with h = x A^T; gradients for x and e only (A and B are frozen).

    Backward: dk = g B (tokens, r); dL/de = sum over tokens of dk * h; dL/dx = (dk * e) A.
    y is the first input because autograd requires that of an in-place op on a view (Linear with
    bias and GPT-2 Conv1D return views); the base layer does not save its output, so adding into it
    is safe (the same reasoning as `lowrank.LowRankAdd`).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, e: torch.Tensor):
        x2 = x.reshape(-1, x.shape[-1]).to(a.dtype)  # (tokens, d_in); a copy only for mixed dtypes
        h = x2 @ a.t()  # (tokens, r)
        y2 = y.view(-1, y.shape[-1])  # (tokens, d_out)
        if y.dtype == a.dtype:
            y2.addmm_(h * e, b.t())
        else:
            y2.add_((h * e) @ b.t())  # fp32 product, rounded once into the bf16 output
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, a, b, e)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, a, b, e = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).to(b.dtype)  # (tokens, d_out)
        dk = g2 @ b  # (tokens, r)
        de = (dk * h).sum(0) if ctx.needs_input_grad[4] else None  # (r,)
        dx = None
        if ctx.needs_input_grad[1]:
            dx = ((dk * e) @ a).view(ctx.x_shape).to(ctx.x_dtype)  # (..., d_in)
        return grad, dx, None, None, de


def diagonal_low_rank_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                e: torch.Tensor) -> torch.Tensor:
    """y + B diag(e) A x with the (d_out, d_in) product formed by autograd (one dtype for all tensors).
    What `DiagonalLowRankAdd` adds into y in place."""
    return y + x @ ((b * e) @ a).T


class DiagonalBasisLayer(AdapterLayer):
    """Wraps nn.Linear / GPT-2 Conv1D with frozen buffers `basis_out` (d_out, r) = B and `basis_in`
    (r, d_in) = A; a subclass fills them and says what the diagonal e is (`diagonal()`)."""

    def __init__(self, base: nn.Module, r: int) -> None:
        super().__init__(base)
        w = weights.get_weight(base)
        d_in, d_out = weights.in_out_features(base)
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.r = r
        self.register_buffer("basis_out", torch.zeros(d_out, r, **kw))
        self.register_buffer("basis_in", torch.zeros(r, d_in, **kw))

    @property
    def factor_kwargs(self) -> dict:
        """Device and dtype of the adapter tensors (for subclasses' own parameters)."""
        return {"device": self.basis_in.device, "dtype": self.basis_in.dtype}

    def diagonal(self) -> torch.Tensor:
        """e in delta = B diag(e) A; zero at init."""
        raise NotImplementedError

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return add_diagonal_low_rank(y, x, self.basis_in, self.basis_out, self.diagonal())

    def delta_weight(self) -> torch.Tensor:
        return (self.basis_out * self.diagonal()) @ self.basis_in  # (d_out, d_in)

    def extra_repr(self) -> str:
        return f"r={self.r}"
