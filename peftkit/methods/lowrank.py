"""The shared low-rank kernel: y += s B A x accumulated into the base output, saving only what backward needs;
and `LinearLowRank`, the same with the base GEMM of a plain frozen nn.Linear in one Function (LoRA).

Also `apply_in_place`, how every in-place kernel of peftkit's methods (this one, DSEE's sparse add, SSF's
scale-shift, the Kronecker and diagonal-basis adds, Hydra's biased add) is called.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_low_rank(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """y + s B A x for a base output y (..., d_out), input x (..., d_in), A (r, d_in), B (d_out, r).

    Added into y in place (`LowRankAdd`) when x, y and the factors share a dtype (or under autocast);
    out of place for mixed dtypes (a bf16 base with fp32 factors). The low-rank methods (LoRA, DoRA,
    AdaLoRA's P diag(E) Q, PEGO's group, Hydra's branches) all end in this one call.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and y.dtype == torch.get_autocast_dtype(device) and y.is_contiguous():
        with torch.autocast(device, enabled=False):  # cast once here, as autocast would inside
            return apply_in_place(LowRankAdd, y, x.to(y.dtype), a.to(y.dtype), b.to(y.dtype), scaling)
    if x.dtype == y.dtype == a.dtype and y.is_contiguous() and not torch.is_autocast_enabled(device):
        return apply_in_place(LowRankAdd, y, x, a, b, scaling)
    h = F.linear(x.to(a.dtype), a)  # (..., r)  mixed dtypes (bf16 base, fp32 adapter): out of place
    return y + F.linear(h, b * scaling).to(y.dtype)


def apply_in_place(function: type[torch.autograd.Function], *args):
    """`function.apply(*args)` when autograd records the call, else `function.forward` alone.

    For Functions that write into an input and `ctx.mark_dirty` it. Why: when nothing is recorded
    (no_grad, inference, or no input requires grad) torch.compile traces the forward by itself, and
    there `mark_dirty` is a graph break at every adapted layer; the Function adds nothing then anyway.
    """
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        return function.apply(*args)
    return function.forward(_Unrecorded(), *args)


class _Unrecorded:
    """Stands in for autograd's ctx when a Function's forward runs without being recorded."""

    def mark_dirty(self, *tensors: torch.Tensor) -> None:
        pass

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


class LowRankAdd(torch.autograd.Function):
    """y + s h B^T with h = x A^T, accumulated into the base output y in place.

    Why not `y + F.linear(F.linear(x, A), s B)`: that allocates and re-reads two (tokens, d_out)
    tensors (the product and the sum) and records four autograd nodes (two of them for the scaling).
    Here one GEMM accumulates into y (`addmm_`, beta=1, alpha=s), backward saves only x (which the
    base layer saves anyway) and the small h = x A^T (tokens, r), and passes dL/dy through untouched.
    y is the first input because autograd requires that of an in-place op on a view (Linear with bias
    and GPT-2 Conv1D return views). The base output must not be saved by the base's own backward
    (true for linear layers: they save x and W).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, d_in)
        h = x2 @ a.t()  # (tokens, r)
        y.view(-1, y.shape[-1]).addmm_(h, b.t(), alpha=scaling)  # (tokens, d_out) += s h B^T
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, h, a, b)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, h, a, b = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (tokens, d_out)
        dh = (g2 @ b).mul_(ctx.scaling)  # (tokens, r)
        dx = (dh @ a).view(x.shape) if ctx.needs_input_grad[1] else None
        da = dh.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[2] else None  # (r, d_in)
        # (h^T g)^T, not g^T h: BLAS reads the wide (tokens, d_out) grad faster untransposed (~1.5x at d_out 1024)
        db = (h.t() @ g2).mul_(ctx.scaling).t() if ctx.needs_input_grad[3] else None  # (d_out, r)
        return grad, dx, da, db, None


def low_rank_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """y + s B A x, the LoRA update (Hu et al. 2021, arXiv:2106.09685) in plain autograd: what `LowRankAdd`
    adds into y in place (and `LinearLowRank` into y = x W0^T + b0). One dtype for all tensors."""
    return y + scaling * F.linear(F.linear(x, a), b)


def linear_low_rank_reference(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None, a: torch.Tensor,
                              b: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = x W0^T + b0 + s (x A^T) B^T in plain autograd: what `LinearLowRank` computes in one Function."""
    return low_rank_reference(F.linear(x, w0, b0), x, a, b, scaling)


def owns_plain_linear(base: torch.nn.Module, x: torch.Tensor, a: torch.Tensor, dropout: torch.nn.Module) -> bool:
    """Whether a kernel may run the base layer's GEMM itself: a plain nn.Linear called through its own
    forward (no hooks, no patched forward), frozen (bias too), one dtype without autocast, no dropout
    active, not being traced by torch.compile (which fuses the plain computation on its own). Shared by
    LoRA's `LinearLowRank` and DoRA's folded kernel."""
    w, bias = getattr(base, "weight", None), getattr(base, "bias", None)
    return (type(base) is torch.nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and "forward" not in base.__dict__ and not w.requires_grad
            and (bias is None or not bias.requires_grad)
            and x.dtype == w.dtype == a.dtype and not torch.is_autocast_enabled(x.device.type)
            and (isinstance(dropout, torch.nn.Identity) or not dropout.training)
            and not torch.compiler.is_compiling())


class LinearLowRank(torch.autograd.Function):
    """y = x W0^T + b0 + s (x A^T) B^T for a frozen nn.Linear, base GEMM and update in one Function.

    Why: with the base layer and `LowRankAdd` as two autograd nodes, backward produces dL/dx twice,
    g W0 (the base's) and dh A (the update's), and autograd allocates and sums them: one more
    (tokens, d_in) tensor written and read per layer. Here one buffer takes both (`addmm_`). Saved: x
    (the base saves it anyway) and h = x A^T (tokens, r); W0 is the layer's own frozen weight, not a
    copy. Measured on the benchmark Llama (LoRA r16 all linear, 2 threads, one process alternating per
    step): 1.221 -> 1.181, 1.191 -> 1.167, 1.232 -> 1.181x the floor.

    Order: the thin product (s h B^T forward, dh A backward; K = r, memory-bound) is written first and
    the base GEMM accumulates into it with beta = 1, where reading the output hides behind the
    arithmetic; accumulating the thin product into the base output costs one more read and write of
    it. Per layer at 1024 tokens, 2 threads: forward + backward overhead over the base GEMMs 0.28 ->
    0.18 ms (384 x 384), 0.79 -> 0.39 ms (384 -> 1024), 0.72 -> 0.32 ms (1024 -> 384); step 0.98x the
    old order (median of 60 per-cycle ratios in one process; NOTES 8).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.t()  # (tokens, r)
        sb = (b * scaling).t()  # scale the (d_out, r) factor, not the (tokens, d_out) product
        # the thin product first, then the base GEMM accumulates into it (beta = 1), where reading the
        # output costs next to nothing; the other order makes one more memory-bound pass over y
        # written into a fresh tensor of the output's shape and returned as is: a view returned from a Function
        # may not be modified in place later (an adapter stacked on this one adds into it)
        out = x.new_empty(*x.shape[:-1], w0.shape[0], dtype=torch.result_type(h, sb))
        y = out.view(-1, w0.shape[0])
        if b0 is None:
            torch.mm(h, sb, out=y)
        else:
            torch.addmm(b0, h, sb, out=y)
        y.addmm_(x2, w0.t())
        ctx.save_for_backward(x, h, w0, a, b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, h, w0, a, b = ctx.saved_tensors
        wants_x, _, _, wants_a, wants_b, _ = ctx.needs_input_grad
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        dh = (g2 @ b).mul_(ctx.scaling) if wants_x or wants_a else None  # (tokens, r)
        db = (h.t() @ g2).mul_(ctx.scaling).t() if wants_b else None  # (h^T g)^T: the fast orientation
        da = dh.t() @ x2 if wants_a else None
        dx = (dh @ a).addmm_(g2, w0).view(x.shape) if wants_x else None  # thin product first, as in forward
        return dx, None, None, da, db, None
