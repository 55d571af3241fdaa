"""SSF: scaling and shifting features (Lian et al., 2022, arXiv:2210.08823).

After each chosen operation a per-channel affine transform of its output:

    y = γ ⊙ base(x) + β,    γ ~ N(1, σ²), β ~ N(0, σ²)   (σ = init_std = 0.02 in the paper's code;
                                                         init_std = 0 is the exact identity)

and merging folds it into the module's own parameters (zero inference cost):

* Linear / GPT-2 Conv1D / Conv2d (output channels): W' = diag(γ) W,  b' = γ ⊙ b + β;
* LayerNorm / RMSNorm (affine weight w, bias c):   w' = γ ⊙ w,      c' = γ ⊙ c + β;
* Embedding (the looked-up rows' columns):          E' = E diag(γ).

Trainable: 2 x (channels) per insertion point with a bias, 1 x (channels) without one (see below).

Choices (methods.md leaves them open):

* Bias-free modules (all of Llama's linears, RMSNorm, embeddings) have no bias to absorb β. By default
  SSF learns only γ there (`bias_free_shift=False`), so every SSF layer still folds into its module and
  the merged model keeps the base's parameter names. On a Llama, SSF is then a learned per-channel
  rescaling of every linear output and norm: the shift would need new bias tensors that transformers'
  Llama cannot load. `bias_free_shift=True` learns β everywhere as the paper's ViT placement does
  (all of a ViT's targets have biases); merging a bias-free module then raises MergeError.
* Norms: only channels-last ones (LayerNorm, RMSNorm-likes) with a 1-D weight. A norm whose output is not
  proportional to its weight (Gemma's `(1 + w) x̂`) is probed at apply time; SSF runs on it but merging
  raises MergeError (w' = γ w would be wrong there).
* Default targets: every linear layer but the head, and every norm ("all-linear", "all-norms"), which on a
  ViT is the paper's placement (qkv, proj, fc1, fc2, norm1, norm2, final norm) except `patch_embed`:
  add "patch_embed.proj" (a Conv2d) to targets for that one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.layer import AdapterLayer, MergeError
from ..core.registry import register
from .lora import adapter_dtype
from .lowrank import apply_in_place


@dataclass
class SSFConfig(AdapterConfig):
    """SSF: a learned per-channel scale and shift after chosen layers, folded into them on merge."""

    method = "ssf"
    paper: ClassVar[str] = "Lian et al. 2022, arXiv:2210.08823"
    trainable: ClassVar[str] = "2 x channels per insertion point (1 x on modules without a bias)"

    targets: str | list[str] | None = field(default_factory=lambda: ["all-linear", "all-norms"])
    """Modules whose outputs are scaled and shifted: linear (incl. GPT-2 Conv1D), Conv2d (per output
    channel), LayerNorm/RMSNorm-like norms with a weight, Embedding. Default: all linear layers but the
    head, and all norms."""

    init_std: float = 0.02
    """Standard deviation of the init: γ ~ N(1, init_std²), β ~ N(0, init_std²) (paper: 0.02).
    0 makes SSF exactly the identity at init."""

    bias_free_shift: bool = False
    """Also learn β on modules without a bias (Llama's linears, RMSNorm, embeddings). Off by default
    because β cannot be folded into a module without a bias: with it on, `merge` raises MergeError."""

    def validate(self) -> None:
        if not self.targets:
            raise ConfigError("SSFConfig needs targets (default: ['all-linear', 'all-norms'])")
        if not (isinstance(self.init_std, int | float) and self.init_std >= 0):
            raise ConfigError(f"init_std must be a number >= 0 (0 = identity at init), got {self.init_std!r}")


def _broadcast_shape(ndim: int, channel_dim: int, channels: int) -> list[int]:
    """[1, ..., channels, ..., 1]: a per-channel vector's view against an ndim-dimensional output."""
    shape = [1] * ndim
    shape[channel_dim] = channels
    return shape


def scale_shift(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, channel_dim: int = -1):
    """γ ⊙ y + β along `channel_dim` (γ of size 1 is a scalar scale).

    Channels-last outputs go through `ScaleShift` (in place, saving only the output, which the next
    layer usually saves anyway), also for a bf16 output with fp32 γ, β (computed in fp32, rounded once).
    Conv2d outputs go out of place: a CNN often follows a conv with an in-place ReLU, which would
    overwrite the output `ScaleShift` saves.
    """
    if channel_dim == -1 and y.is_contiguous():
        return apply_in_place(ScaleShift, y, scale, shift)
    shape = _broadcast_shape(y.ndim, channel_dim, scale.numel())
    out = y * scale.view(shape) if shift is None else torch.addcmul(shift.view(shape), y, scale.view(shape))
    return out.to(y.dtype)


class ScaleShift(torch.autograd.Function):
    """z = γ ⊙ y + β written into the base output y (..., C).

    Why in place: an out-of-place `addcmul` keeps y alive for dγ = Σ g ⊙ y, a (tokens, C) tensor per
    insertion point that nothing else saves (a linear layer saves its input, not its output). Here only
    z is saved (the next op saves it too as a rule: activations, attention, the MLP product) and
    y = (z - β) / γ is recovered in backward, so dγ = (Σ g ⊙ z - β ⊙ Σ g) / γ. That needs γ != 0,
    which holds for γ trained from ~1 in fp32. As for LoRA's kernel, y is an input of the Function
    because Linear with bias and GPT-2 Conv1D return views. A bf16 y (bf16 model, autocast) is scaled
    by the fp32 γ without rounding γ to bf16 (its steps near 1 are 0.008, coarser than SSF's updates);
    the reductions of backward accumulate in γ's dtype.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None):
        if shift is None:
            y.mul_(scale)
        else:  # one pass over y (a full alias of an input is allowed as `out`)
            torch.addcmul(shift, y, scale, out=y)
        ctx.mark_dirty(y)
        ctx.save_for_backward(y, scale, shift)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, scale, shift = ctx.saved_tensors
        g2, z2 = grad.reshape(-1, grad.shape[-1]), z.reshape(-1, z.shape[-1])  # (tokens, C)
        need_scale, need_shift = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc = scale.dtype
        g_sum = g2.sum(0, dtype=acc) if need_shift or (need_scale and shift is not None) else None  # (C,)
        d_scale = d_shift = None
        if need_scale:
            gy = (g2 * z2).sum(0, dtype=acc)  # (C,) Σ g ⊙ z
            if shift is not None:
                gy = gy - shift * g_sum  # Σ g ⊙ (z - β)
            gy = gy / scale  # Σ g ⊙ y
            d_scale = gy if scale.numel() > 1 else gy.sum().view(1)
        if need_shift:
            d_shift = g_sum
        d_y = torch.mul(grad, scale, out=torch.empty_like(grad)) if ctx.needs_input_grad[0] else None
        return d_y, d_scale, d_shift


def scale_shift_reference(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """γ ⊙ y + β over the last dimension, out of place (one dtype). What `ScaleShift` computes in place."""
    return y * scale if shift is None else y * scale + shift


KINDS: dict[str, tuple[int, int]] = {
    "linear": (-1, 0), "conv1d": (-1, 0), "norm": (-1, 0), "conv2d": (-3, 0), "embedding": (-1, 1),
}
"""Layer kind -> (channel dim of its output, axis of its canonical weight that γ scales)."""


def module_kind(module: nn.Module) -> str | None:
    """The SSF kind of a module (None: SSF does not support it)."""
    kind = weights.layer_kind(module)
    if kind is None and _channels_last_norm(module):
        return "norm"
    return kind if kind in KINDS else None


def _channels_last_norm(module: nn.Module) -> bool:
    if not weights.is_norm(module) or isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return False  # GroupNorm/BatchNorm normalise channel dim 1, not the last
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.ndim == 1


@torch.no_grad()
def _output_scales_with_weight(norm: nn.Module) -> bool:
    """True when norm(x) - c is proportional to the weight w (doubling w doubles it), so w' = γ w folds γ.

    False for Gemma-style norms computing (1 + w) x̂, and for a norm that cannot run on the probe (then
    merging refuses rather than guess). Deterministic probe input: no RNG is consumed.
    """
    w = norm.weight
    x = torch.linspace(-2.0, 3.0, 2 * w.numel(), device=w.device).sin().view(2, -1).to(w.dtype)
    bias = getattr(norm, "bias", None)
    shift = 0.0 if bias is None else bias
    original = w.detach().clone()
    try:
        before = norm(x) - shift
        w.mul_(2.0)
        after = norm(x) - shift
    except (RuntimeError, TypeError, ValueError):
        return False
    finally:
        w.copy_(original)
    return bool(torch.allclose(after, 2.0 * before, rtol=1e-2, atol=1e-4))


class SSFLayer(AdapterLayer):
    """γ ⊙ base(x) + β per output channel (β only when `shift`); folds into the base's weight and bias."""

    def __init__(self, base: nn.Module, kind: str, shift: bool, init_std: float, module_name: str,
                 scale_size: int | None = None) -> None:
        super().__init__(base)
        w = weights.get_weight(base)
        self.channel_dim, self.weight_axis = KINDS[kind]
        channels = w.shape[self.weight_axis]
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.init_std, self.module_name = init_std, module_name
        self.scale = nn.Parameter(torch.ones(scale_size or channels, **kw))
        self.register_parameter("shift", nn.Parameter(torch.zeros(channels, **kw)) if shift else None)
        self.foldable = kind != "norm" or _output_scales_with_weight(base)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.scale.fill_(1.0)
            if self.shift is not None:
                self.shift.zero_()
            if self.init_std > 0:
                self.scale.add_(torch.randn_like(self.scale), alpha=self.init_std)
                if self.shift is not None:
                    self.shift.add_(torch.randn_like(self.shift), alpha=self.init_std)

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scale_shift(y, self.scale, self.shift, self.channel_dim)

    def _scale_like(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scale.view(_broadcast_shape(weight.ndim, self.weight_axis, self.scale.numel())).to(weight.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.foldable:
            raise MergeError(f"{self.module_name}: its output is not proportional to its weight (a (1 + w) "
                             "norm?), so the scale cannot be folded into it; exclude it from targets to merge")
        if self.shift is not None and weights.get_bias(self.base) is None:
            raise MergeError(f"{self.module_name} has no bias to fold SSF's shift into; apply SSF with "
                             "bias_free_shift=False (scale only on bias-free modules) to merge")
        return weight * self._scale_like(weight)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / self._scale_like(weight)

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None:  # no shift here: merged_weight refused a shift on a bias-free module
            return None
        out = bias * self.scale.to(bias.dtype)
        return out if self.shift is None else out + self.shift.to(bias.dtype)

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        bias = bias if self.shift is None else bias - self.shift.to(bias.dtype)
        return bias / self.scale.to(bias.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, shift={self.shift is not None}, init_std={self.init_std:g}"


@register(SSFConfig)
def build(module: nn.Module, cfg: SSFConfig, name: str) -> SSFLayer | None:
    """Wrap a supported module; β wherever the module has a bias to fold it into (or everywhere if asked)."""
    kind = module_kind(module)
    if kind is None:
        return None
    shift = weights.get_bias(module) is not None or cfg.bias_free_shift
    return SSFLayer(module, kind, shift, cfg.init_std, name)
