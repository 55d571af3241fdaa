"""Bone: block-affine adaptation with the "weight guide" (Jiale Kang, 2024, arXiv:2409.15371).

W0 (d_out x d_in) is cut into r x r blocks W0_ij; row block i owns one trainable b_i (r x r), and

    W_ij = W0_ij + W0_ij b_i + b_i = W0_ij (I + b_i) + b_i,      y = W x + b0,

so the update of every block is guided by the block itself. b = 0 at init (the identity). Hugging
Face peft calls this MiSS with `init_weights="bat"` (its `miss_block`, shape (d_out/r, r, r), is b);
files convert both ways. Trainable parameters per layer: d_out r. Requires r | d_in and r | d_out.

Merge writes W; unmerge solves W0_ij = (W_ij - b_i)(I + b_i)^{-1} (exact up to round-off; a
singular I + b_i raises MergeError). Linear layers (nn.Linear, GPT-2 Conv1D); peft has nn.Linear only.

Forward. dW depends on W0, so some weight-sized work per step is unavoidable. Measured on one
layer (fp32, 1 thread, 1024 tokens, r = 64, forward + backward, CPU time, medians of 15 interleaved
runs on a shared machine, so noisy; "floor" = the frozen layer with input gradients only):

    (d_out, d_in)                   (384, 384)  (1024, 384)  (384, 1024)
    peft's form (W in autograd)        1.66x       1.69x        1.65x
    batched y_i = sum_j W0_ij (b_i x_j) + b_i sum_j x_j
                                       5.8x        7.1x         6.3x
    this Function, W recomputed        1.69x       1.67x        1.63x
    this Function, W saved             1.61x       1.60x        1.57x

The batched form applies d_out/r different transforms to x: a (tokens, d_out/r, d_in) tensor and
twice the base's arithmetic. The merged form needs three GEMMs of the base's size (y = x W^T,
dx = g W, and dL/dW = g^T x, from which db_i = sum_j W0_ij^T dW_ij + sum_j dW_ij) plus three
d_out x d_in x r products (r / tokens = 6% of a GEMM each); the GEMM count is the floor's two plus
the weight gradient, which no exact form avoids (db is a W0-weighted contraction of g^T x, and any
per-token route costs as much). `BlockAffineLinear` builds W under no_grad and computes the
gradients by hand, so autograd keeps neither W nor dW, and recomputes W in backward rather than
saving it. On the 16.8M-parameter benchmark Llama (all 7 projections, r = 64, batch 4 x 256, AdamW,
CPU time, 1 thread, interleaved in one process): floor 1.00x, LoRA r16 1.11x, this 1.36x, the same
with W saved 1.33x, peft's MiSS "bat" 1.38x. The weight gradient alone is ~1.25x there; saving W
would hold a weight-sized tensor per layer until backward (+42 MB, ~1.14x LoRA r16's peak memory,
against ~1.05x now), so W is recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.layer import AdapterLayer, MergeError
from ..core.registry import register
from .lora import adapter_dtype


@dataclass
class BoneConfig(AdapterConfig):
    """Bone: one trainable r x r matrix per row of r x r weight blocks, guided by the blocks."""

    method = "bone"
    paper: ClassVar[str] = "Kang 2024, arXiv:2409.15371"
    trainable: ClassVar[str] = "d_out r per layer"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); every linear layer but the head by default."""

    r: int = 64
    """Block size: r must divide d_in and d_out of every adapted layer (peft's default, 64)."""

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"Bone block size r must be a positive integer, got r={self.r!r}")


# --- the math, on plain tensors -----------------------------------------------------------------
def block_affine_weight(w0: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """W with W_ij = W0_ij (I + b_i) + b_i, computed in the dtype of `blocks` (d_out, d_in)."""
    n, r = blocks.shape[0], blocks.shape[-1]
    d_out, d_in = w0.shape
    # (n, d_in, r) holds row block i as rows (a, j), columns c: [i, a d_in/r + j, c] = W0[i r + a, j r + c]
    rows = w0.to(blocks.dtype).reshape(n, d_in, r)
    # one bmm with I + b_i: baddbmm(rows, rows, b) would first copy the weight-sized `rows` into its output
    w = torch.bmm(rows, blocks + torch.eye(r, dtype=blocks.dtype, device=blocks.device))  # W0_ij (I + b_i)
    w.view(n, r, d_in // r, r).add_(blocks[:, :, None, :])  # + b_i on every block of row block i
    return w.view(d_out, d_in)


def block_affine_grad(w0: torch.Tensor, grad_w: torch.Tensor, r: int) -> torch.Tensor:
    """dL/db_i = sum_j W0_ij^T G_ij + sum_j G_ij from G = dL/dW (d_out, d_in); (d_out/r, r, r)."""
    d_out, d_in = w0.shape
    n = d_out // r
    g = grad_w.reshape(n, d_in, r)
    rows = w0.to(g.dtype).reshape(n, d_in, r)
    return torch.baddbmm(g.view(n, r, d_in // r, r).sum(2), rows.transpose(1, 2), g)


class BlockAffineLinear(torch.autograd.Function):
    """y = x W^T + b0 with W = block_affine_weight(W0, b); W and dL/dW never reach autograd.

    Saves x (which LoRA saves too), the frozen W0 (a view of the parameter) and b. x and the
    result share one compute dtype; W is built in the adapter dtype and cast to it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None, blocks: torch.Tensor):
        w = block_affine_weight(w0, blocks).to(x.dtype)
        ctx.save_for_backward(x, w0, blocks)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w0, blocks = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (tokens, d_out)
        dx = dbias = dblocks = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ block_affine_weight(w0, blocks).to(g2.dtype)).view(x.shape)
        if ctx.needs_input_grad[2]:
            dbias = g2.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            grad_w = (g2.t() @ x.reshape(-1, x.shape[-1])).to(blocks.dtype)  # (d_out, d_in), freed on return
            dblocks = block_affine_grad(w0, grad_w, blocks.shape[-1])
        return dx, None, dbias, dblocks


def block_affine_reference(x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None,
                           blocks: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b0 with W_ij = W0_ij (I + b_i) + b_i (the paper's eq. for Bone), W formed by autograd.

    w0 (d_out, d_in), blocks (d_out/r, r, r); one dtype for all tensors. What `BlockAffineLinear` computes.
    """
    n, r = blocks.shape[0], blocks.shape[-1]
    d_out, d_in = w0.shape
    w0_blocks = w0.reshape(n, r, d_in // r, r).transpose(1, 2)  # (n, d_in/r, r, r): [i, j] = W0_ij
    eye = torch.eye(r, dtype=blocks.dtype, device=blocks.device)
    w_blocks = w0_blocks @ (eye + blocks[:, None]) + blocks[:, None]  # W_ij = W0_ij (I + b_i) + b_i
    return F.linear(x, w_blocks.transpose(1, 2).reshape(d_out, d_in), bias)


def block_affine_linear(x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None,
                        blocks: torch.Tensor) -> torch.Tensor:
    """The Bone forward; under autocast x is cast once and the product runs in the autocast dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return BlockAffineLinear.apply(x.to(torch.get_autocast_dtype(device)), w0, bias, blocks)
    return BlockAffineLinear.apply(x, w0, bias, blocks)


# --- the layer ------------------------------------------------------------------------------------
class BoneLinear(AdapterLayer):
    """Bone on nn.Linear and GPT-2 Conv1D: `bone_blocks` (d_out/r, r, r) is peft's `miss_block`."""

    def __init__(self, base: nn.Module, r: int, name: str = "") -> None:
        super().__init__(base)
        d_in, d_out = weights.in_out_features(base)
        if d_in % r or d_out % r:
            raise ConfigError(f"Bone block size r={r} must divide d_in={d_in} and d_out={d_out} of "
                              f"{name or 'a layer'}; choose r among the common divisors "
                              f"{_divisors(d_in, d_out)}, or exclude the module")
        w = weights.get_weight(base)
        self.r = r
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.bone_blocks = nn.Parameter(torch.zeros(d_out // r, r, r, **kw))  # b_i for row block i

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bone_blocks)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.stacked():  # on another adapter: its output plus this one's weight-space update
            w = weights.get_weight(self.base)
            y = self.base(x, *args, **kwargs)
            update = block_affine_weight(w, self.bone_blocks) - w
            return y + torch.nn.functional.linear(x.to(update.dtype), update).to(y.dtype)
        # the base's own bias Parameter, so a bias trained elsewhere keeps its gradient
        return block_affine_linear(x, weights.get_weight(self.base), self.bias, self.bone_blocks)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return block_affine_weight(weight, self.bone_blocks.detach()).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W0_ij = (W_ij - b_i)(I + b_i)^{-1}, solved in float64."""
        b = self.bone_blocks.detach().double()
        n, r = b.shape[0], self.r
        d_out, d_in = weight.shape
        affine = torch.eye(r, dtype=b.dtype, device=b.device) + b  # (n, r, r)
        singular = ~(torch.linalg.cond(affine) <= 1e12)  # inf or NaN for exactly singular blocks
        if bool(singular.any()):
            raise MergeError(f"cannot unmerge Bone: I + b_i is singular for row block(s) "
                             f"{torch.nonzero(singular).flatten().tolist()[:5]}; the merged weights stay")
        shifted = weight.double().reshape(n, r, d_in // r, r) - b[:, :, None, :]
        w0 = torch.linalg.solve(affine, shifted.reshape(n, d_in, r), left=False)  # X (I + b_i) = W - b_i
        return w0.reshape(d_out, d_in).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}"


def _divisors(d_in: int, d_out: int) -> list[int]:
    g = math.gcd(d_in, d_out)
    return [k for k in range(1, g + 1) if g % k == 0][-6:]


@register(BoneConfig)
def build(module: nn.Module, cfg: BoneConfig, name: str) -> BoneLinear | None:
    """Wrap linear layers (nn.Linear, GPT-2 Conv1D); other matched modules are left alone."""
    if not weights.is_linear(module):
        return None
    return BoneLinear(module, cfg.r, name)
