"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,     y = W' x + b0

with a trainable magnitude m in R^{d_out} initialised to ||W0||_row (so the model is unchanged at
init), the LoRA factors A, B as in LoRA, and the norm taken over the input dimension of each output
row (peft's `lora_magnitude_vector` convention). As in the paper (Sec. 4.3) and peft, the norm is
detached: gradients do not flow through it. A row whose norm is 0 (an all-zero base row while B_i = 0)
is scaled by 1 instead of peft's m / 0 = NaN (`DoRALinear.row_scale`); other rows are peft's exactly.

The row norm is computed without materialising W0 + s B A:

    ||W0 + s B A||_i^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 B_i (A A^T) B_i^T,

which costs d_out x d_in x r multiply-adds instead of a weight-sized temporary every step; ||W0||^2
per row is cached while the base weight stays the same storage at the same version (`_BaseRowNorm`).
Linear layers only. Trainable per layer: r (d_in + d_out) + d_out.

Unmerged forward, two kernels (same math, float rounding aside):

* `FoldedDoRA`, for a plain bias-free nn.Linear seeing at least d_in tokens (Llama-style projections
  in training and prefill): y = x W'^T with W' = (m / n) (W0 + s B A) formed for the call, one GEMM
  like the base's; backward forms W' again for dL/dx. Forming W' moves ~d_out x d_in values, the
  low-rank add and row scaling ~tokens x d_out each, so from d_in tokens on this is the cheaper side.
* `ScaleRows` otherwise (biases, GPT-2 Conv1D, hooks, autocast, dropout, few tokens):
  y = (m / n) * (W0 x + s B A dropout(x)) + b0, the low-rank term added into base(x) in place
  (LoRA's kernel) and the row scaling applied in place.

Memory: both save the layer's OUTPUT for dL/d(scale)_i = sum_t g_ti y_ti / scale_i instead of a copy of
the direction. Where the consumer saves the output too (Llama's gate and up projections: SiLU's input,
the gate product), autograd holds one (tokens, d_out) tensor where it held two; elsewhere (residual
adds, rotary embeddings) the output costs what the direction did. A row with scale 0 (m_i = 0) cannot
be divided back, so then the direction is saved as before. Consequence: code that changes a DoRA
layer's output in place (an `inplace=True` activation right after it) makes backward raise autograd's
"modified by an inplace operation" error. On the benchmark Llama (DoRA r8 on all 7 projections, 4 x 256
tokens) autograd saved 294 MB of activations (parameters aside) before these kernels, 245 MB after;
LoRA r16: 202 MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

from ..core import weights
from ..core.registry import register
from .lora import LoRAConfig, LoRALinear
from .lowrank import owns_plain_linear


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA: LoRA direction plus a trainable per-row magnitude."""

    method = "dora"
    paper: ClassVar[str] = "Liu et al. 2024, arXiv:2402.09353"
    trainable: ClassVar[str] = "r (d_in + d_out) + d_out per layer"

    def validate(self) -> None:
        super().validate()


class DoRALinear(LoRALinear):
    """DoRA on nn.Linear and GPT-2 Conv1D."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str) -> None:
        super().__init__(base, r, scaling, dropout, init)
        self._base_norm = _BaseRowNorm()
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
            w0 = weights.get_weight(self.base)  # (d_out, d_in)
            w = w0.to(self.lora_A.dtype)
            a, b, s = self.lora_A, self.lora_B, self.scaling
            # 2s <B_i, (W0 A^T)_i> + s^2 <B_i, (B A A^T)_i> = sum over r of (2s A W0^T + s^2 A A^T B^T) * B^T;
            # A W0^T rather than W0 A^T: the GEMM reads W0 ~1.6x faster in that orientation (CPU, MKL)
            cross = torch.addmm((a @ a.T) @ b.T, a, w.T, beta=s * s, alpha=2 * s)  # (r, d_out)
            sq = self._base_norm.squared(self.base, w0, w) + (cross * b.T).sum(0)
            return sq.clamp_min(0).sqrt()

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One GEMM with W' = (m / n)(W0 + s B A) where that is equivalent and cheaper (`_folds`),
        else base(x) followed by `adapt`."""
        if args or kwargs or not self._folds(x):
            return self.adapt(x, self.base(x, *args, **kwargs))
        scale = self.row_scale()  # (d_out,)
        if torch.is_grad_enabled() and bool((scale == 0).any()):  # d(scale) from the output: see ScaleRows
            return self._scaled_direction(x, self.base(x), scale)
        w0 = weights.get_weight(self.base)
        return FoldedDoRA.apply(x, w0, self.lora_A, self.lora_B, scale, self.scaling)

    def _folds(self, x: torch.Tensor) -> bool:
        """Whether y = x W'^T, with W' formed for this call, replaces base(x) + low-rank term + row scaling.

        The same computation only for a plain bias-free nn.Linear run by its own forward (no hooks), frozen,
        in one dtype without autocast, with no dropout active; cheaper once tokens >= d_in (forming W' moves
        ~d_out x d_in values, the add and the scaling ~tokens x d_out each, in forward and again in backward).
        """
        return (getattr(self.base, "bias", None) is None and x.numel() >= x.shape[-1] ** 2
                and owns_plain_linear(self.base, x, self.lora_A, self.dropout))

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._scaled_direction(x, y, self.row_scale())

    def row_scale(self, norm: torch.Tensor | None = None) -> torch.Tensor:
        """m / ||W0 + s B A|| per output row, and 1 where that norm is 0; every kernel and the merge use it.

        Why 1: such a row's direction W0_i + s B_i A is all zero, so its output is 0 whatever the scale,
        while peft's m / 0 gives NaN (0 / 0 at init, on a base with an all-zero row) that the next layer
        spreads to every output. With 1 the row stays 0 and finite, B_i still gets its gradient s A x g_i
        (so it can grow out of zero) and m_i gets none. Rows with a non-zero norm are peft's m / n exactly.
        """
        norm = self.row_norm() if norm is None else norm
        zero = norm == 0
        return torch.where(zero, 1.0, self.magnitude / torch.where(zero, 1.0, norm))

    def _scaled_direction(self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """scale * (y - b0 + s B A dropout(x)) + b0 for the base output y."""
        bias = self.bias
        y_nobias = y if bias is None else y - bias
        # W0 x + s B A x through LoRA's low_rank: added into the base output in place when dtypes agree;
        # y is cast to the adapter dtype first (a no-op unless the base runs in another dtype)
        direction = self.low_rank(self.dropout(x), y_nobias.to(scale.dtype), self.lora_A, self.lora_B)
        out = scale_rows(direction, scale)
        return (out if bias is None else out + bias).to(y.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        norm = self.row_norm()
        self._merged_norm = norm
        return self.row_scale(norm)[:, None] * (weight + self.delta_weight().to(weight.dtype))

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        norm = self._merged_norm if self._merged_norm is not None else weight.norm(dim=1)
        inverse = torch.where(norm == 0, 1.0, norm / self.magnitude)  # 1 / row_scale
        return weight * inverse[:, None] - self.delta_weight().to(weight.dtype)

    def needs_base_copy(self) -> bool:
        """A row with m_i = 0 and a non-zero norm merges to zeros, from which W0_i cannot be divided back."""
        with torch.no_grad():
            return bool(((self.magnitude == 0) & (self.row_norm() != 0)).any())


class _BaseRowNorm:
    """||W0||^2 per row, kept while the base weight is the same storage, view and version.

    Why: recomputing it reads the whole weight every step, and W0 is frozen. The storage is held by a
    weak reference (a replaced weight's memory is freed, and a new one at the same address is not
    mistaken for it); `_version` catches in-place writes, `weights.set_weight` included (merge, unmerge,
    PiSSA's residual shift). A write through `.data` bumps no version and is not seen: call
    `layer._base_norm.forget()` after one. Bases with their own weight protocol (`peftkit_get_weight` / `peftkit_set_weight`, e.g. a
    fresh dequantized tensor per read) and code being compiled (torch.compile traces the plain
    computation) are not cached. Copies and pickles start empty.
    """

    def __init__(self) -> None:
        self.storage: StorageWeakRef | None = None
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    def squared(self, base: nn.Module, w0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_j W0_ij^2 (d_out,) in w's dtype; w0 is the base weight as stored, w its working-dtype copy."""
        custom = hasattr(base, "peftkit_get_weight") or hasattr(base, "peftkit_set_weight")
        if custom or torch.compiler.is_compiling():
            return w.pow(2).sum(1)
        storage = w0.untyped_storage()
        key = (storage._cdata, w0.storage_offset(), w0.shape, w0.stride(), w0._version, w.dtype)
        if self.storage is None or self.storage.expired() or key != self.key:
            self.storage, self.key, self.value = StorageWeakRef(storage), key, w.pow(2).sum(1)
        return self.value

    def forget(self) -> None:
        self.storage, self.key, self.value = None, None, None

    def __reduce__(self):
        return (_BaseRowNorm, ())  # copy, deepcopy and pickle give an empty cache


def scale_rows(direction: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """direction * scale (scale over the last dim), in place when autograd allows (see `ScaleRows`).

    Under torch.compile the plain product is traced (the partitioner decides what to save, and the
    zero check below would break the graph); with nothing to record it is an in-place multiply.
    """
    if torch.compiler.is_compiling():
        return direction * scale
    if not (torch.is_grad_enabled() and (direction.requires_grad or scale.requires_grad)):
        return direction.mul_(scale)
    # m_i = 0 makes scale_i = 0: that row of the output cannot be divided back into the direction
    return ScaleRows.apply(direction, scale, bool((scale == 0).any()))


class ScaleRows(torch.autograd.Function):
    """out = direction * scale per output feature, written into `direction`; backward from the output.

    Why: `scale * direction` out of place keeps the direction alive for d(scale) next to the output,
    a second (tokens, d_out) tensor per layer. Here dL/d(scale)_i = sum_t g_ti out_ti / scale_i, and
    where the consumer saves the output as well (SiLU, a product) autograd stores it once. The direction is
    cloned and saved instead (the old cost) when some scale_i is 0. The direction must be a tensor
    nothing else reads afterwards (the base output, possibly with the low-rank term added in place).
    """

    @staticmethod
    def forward(ctx, direction: torch.Tensor, scale: torch.Tensor, keep_direction: bool) -> torch.Tensor:
        kept = direction.clone() if keep_direction else None
        direction.mul_(scale)
        ctx.mark_dirty(direction)
        ctx.save_for_backward(direction if kept is None else kept, scale)
        ctx.from_output = kept is None
        return direction

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, scale = ctx.saved_tensors  # saved: the output, or the direction
        wants_direction, wants_scale = ctx.needs_input_grad[:2]
        if not wants_scale:
            return grad * scale if wants_direction else None, None, None
        product = grad * saved  # (..., d_out); its buffer is reused for the direction's gradient
        d_scale = product.sum(dim=tuple(range(product.dim() - 1)))  # (d_out,)
        if ctx.from_output:
            d_scale = d_scale / scale
        d_direction = torch.mul(grad, scale, out=product) if wants_direction else None
        return d_direction, d_scale, None


def scale_rows_reference(direction: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """direction * scale over the last dim: DoRA's m / ||W0 + s B A||_row applied to x (W0 + s B A)^T + ...,
    out of place. What `ScaleRows` computes in place."""
    return direction * scale


def folded_dora_reference(x: torch.Tensor, w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          scale: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = x W'^T with W' = scale (W0 + s B A) row-wise, W' formed by autograd (scale: DoRA's m / ||W0 + s B A||,
    its norm detached by the caller as in the paper's section 4.3). What `FoldedDoRA` computes."""
    return x @ (scale[:, None] * (w0 + scaling * b @ a)).T


class FoldedDoRA(torch.autograd.Function):
    """y = x W'^T with W' = scale (W0 + s B A) formed for the call (bias-free base, see DoRALinear._folds).

    Why: the base GEMM with W' in place of W0 gives the adapted output directly, where base(x) + the
    low-rank add + the row scaling move (tokens, d_out) values three more times forward, and backward
    (g * scale, then the low-rank and base input gradients summed) about four more times; W' is formed
    again in backward instead of being kept (a weight-sized tensor per layer). Saved: x (which LoRA-style
    kernels keep anyway), the output (as in ScaleRows: dL/d(scale)_i = sum_t g_ti y_ti / scale_i, so no
    scale_i may be 0) and the (d_out,) scale; h = x A^T is recomputed, it costs tokens x d_in x r.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                scaling: float) -> torch.Tensor:
        # the output is allocated before the weight-sized temporary W', so that W' is freed from the top of
        # the heap rather than leaving a hole under the saved output (peak RSS ~13 MB lower on the benchmark)
        out = x.new_empty(*x.shape[:-1], w0.shape[0])  # (..., d_out)
        w = _folded_weight(w0, a, b, scale, scaling)
        torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out=out.view(-1, w.shape[0]))
        ctx.save_for_backward(x, w0, a, b, scale, out)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w0, a, b, scale, out = ctx.saved_tensors
        wants_x, _, wants_a, wants_b, wants_scale, _ = ctx.needs_input_grad
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (tokens, d_in / d_out)
        d_scale = (g2 * out.reshape(g2.shape)).sum(0) / scale if wants_scale else None
        dx = (g2 @ _folded_weight(w0, a, b, scale, ctx.scaling)).view(x.shape) if wants_x else None
        row_factor = (ctx.scaling * scale)[:, None]  # dy_i/dh = s scale_i B_i
        da = (g2 @ (b * row_factor)).t() @ x2 if wants_a else None  # (r, d_in)
        db = ((x2 @ a.t()).t() @ g2).t() * row_factor if wants_b else None  # (h^T g)^T: (d_out, r)
        return dx, None, da, db, d_scale, None


def _folded_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                   s: float) -> torch.Tensor:
    """W' = scale (W0 + s B A), (d_out, d_in)."""
    return torch.addmm(w0, b, a, alpha=s).mul_(scale[:, None])


@register(DoRAConfig)
def build(module: nn.Module, cfg: DoRAConfig, name: str) -> DoRALinear | None:
    """DoRA wraps linear layers only; other matched modules are left alone."""
    if not weights.is_linear(module):
        return None
    return DoRALinear(module, cfg.rank_for(name), cfg.scaling_for(name), cfg.dropout, cfg.init)
