"""PEGO: a group of LoRA modules with orthogonal regularization (Hu, Zhang, Qi, Shi, Gao, 2024, arXiv:2407.15085).

N parallel LoRA modules per adapted projection, and an L1 penalty that keeps each update orthogonal to
the pretrained weight ("preserve") and to the other modules' updates ("diversify"):

    y = W x + b + sum_i Delta W_i x,      Delta W_i = s B_i A_i,   A_i (r, d_in), B_i (d_out, r),
    L = task loss + lambda sum_layers sum_i [ |W Delta W_i^T|_1 + sum_{j>i} |Delta W_i Delta W_j^T|_1 ].

The group is stored and run as ONE stacked rank-N r LoRA: A = [A_1; ...; A_N] (N r, d_in) and
B = [B_1, ..., B_N] (d_out, N r), so sum_i B_i A_i x = B A x is one call of the shared low-rank kernel
and merging folds W + s B A. Init as the reference: each A_i ~ kaiming_uniform(a=sqrt(5)) (the stacked
A draws from the same distribution), B = 0, so the model and the penalty are unchanged/zero at init.
Trainable parameters per layer: N r (d_in + d_out).

Scaling: the reference adds sum_i B_i A_i unscaled; `alpha=None` (default) does the same (s = 1), a
number gives s = alpha / r like LoRA. The penalty is taken on the update as applied, Delta W_i = s B_i A_i.

The penalty never forms a weight-sized product of parameters with autograd attached. Each term is the
L1 norm of a thin product P = X Y^T (d_out, d_out) with X, Y (d_out, r), kept as X^T, Y^T (r, d_out):

    W Delta W_i^T          = (s W A_i^T) B_i^T,           X^T = s A_i W^T,             Y^T = B_i^T
    Delta W_i Delta W_j^T  = B_i (s^2 A_i A_j^T) B_j^T,   X^T = (s^2 A_j A_i^T) B_i^T,  Y^T = B_j^T

`L1OfProducts` computes all N (N + 1) / 2 terms of a layer in chunks of rows, and their gradients in
the same pass (dX^T = Y^T sign(P)^T, dY^T = X^T sign(P), and |P|_1 = <dX, X>), saving only the
(T, r, d_out) gradients for backward: no (d_out, d_out) tensor outlives the call. The (r, d_out) layout
is what makes BLAS fast here: on CPU, sign(P) Y with Y (d_out, 4) took 4.3 ms against 1.0 ms for
Y^T sign(P)^T (one thread, d_out 1024, noisy shared machine).

Cost: about 4 passes over N (N + 1) / 2 d_out^2 floats per layer and step, which no exact form avoids
(the L1 norm needs every sign). On the benchmark Llama (hidden 384, inter 1024, all 7 linear layers,
N = 4, r = 4, batch 4x256; CPU, one thread, a heavily shared machine, so noisy) the penalty's forward
plus backward took ~0.35x a floor step: a PEGO step was ~1.0-1.1x the floor without it and ~1.4x with
it on every step, at LoRA r16's peak memory. `penalty_every=k` evaluates it on every k-th step only,
weighted by k (the same gradient on average), for ~0.35/k. The penalty enters training through the
method schedule (`PEGOSchedule.extra_loss`, core/schedule.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.layer import adapter_layers
from ..core.registry import register
from ..core.schedule import MethodSchedule, register_schedule
from .lora import LoRALinear

CHUNK_ELEMENTS = 1 << 19
"""Most product entries the penalty materialises at once (2 MiB in fp32: the sign pattern is read twice
more right after it is written, and cache-sized chunks measured ~15% faster than whole (d_out, d_out) terms)."""


@dataclass
class PEGOConfig(AdapterConfig):
    """A group of N LoRA modules per projection plus the orthogonality penalty."""

    method = "pego"
    paper: ClassVar[str] = "Hu et al. 2024, arXiv:2407.15085"
    trainable: ClassVar[str] = "num_modules r (d_in + d_out) per layer"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); the paper adapts the query and value projections."""

    r: int = 4
    """Rank of each LoRA module of the group (the reference's 4)."""

    num_modules: int = 4
    """N: LoRA modules per adapted projection (the reference uses 2 on PACS, 4 elsewhere)."""

    alpha: float | None = None
    """Scale numerator: the group's update is multiplied by alpha / r; None: scale 1, as the reference."""

    ortho_lambda: float = 1e-3
    """lambda: weight of the orthogonality penalty in the loss (the reference's `ld`)."""

    penalty_every: int = 1
    """Evaluate the penalty on every k-th optimizer step only, weighted by k (1: every step, as the paper)."""

    def validate(self) -> None:
        for name in ("r", "num_modules", "penalty_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"PEGO {name} must be a positive integer, got {value!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha must be positive or None (scale 1), got {self.alpha}")
        if self.ortho_lambda < 0:
            raise ConfigError(f"ortho_lambda must be >= 0, got {self.ortho_lambda}")

    @property
    def scaling(self) -> float:
        """s: alpha / r, or 1 when alpha is None."""
        return 1.0 if self.alpha is None else self.alpha / self.r


class PEGOLinear(LoRALinear):
    """A PEGO group on nn.Linear or GPT-2 Conv1D, stored as one rank-N r LoRA (module i: rows i r..(i+1) r)."""

    def __init__(self, base: nn.Module, cfg: PEGOConfig) -> None:
        d_in, d_out = weights.in_out_features(base)
        total = cfg.num_modules * cfg.r
        if total > min(d_in, d_out):
            raise ConfigError(f"PEGO's group rank num_modules * r = {total} exceeds the layer's min(d_in, d_out) = "
                              f"{min(d_in, d_out)}; lower r or num_modules")
        super().__init__(base, total, cfg.scaling, 0.0, "kaiming")
        self.num_modules, self.module_rank = cfg.num_modules, cfg.r

    def extra_repr(self) -> str:
        return f"num_modules={self.num_modules}, r={self.module_rank}, scaling={self.scaling:g}"

    def penalty_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(X^T, Y^T), each (T, r, d_out): the layer's penalty is sum_t |X_t Y_t^T|_1 (module docstring)."""
        n, r, s = self.num_modules, self.module_rank, self.scaling
        a, b = self.lora_A, self.lora_B  # (n r, d_in), (d_out, n r)
        # in the factors' dtype even under autocast: a bf16 A W^T next to fp32 B^T broke the chunked
        # products (mixed dtypes), and the sign pattern of the products needs the full precision anyway
        with torch.autocast(a.device.type, enabled=False):
            w = weights.get_weight(self.base).to(a.dtype)  # (d_out, d_in), frozen
            b_t = b.T.contiguous().view(n, r, -1)  # (n, r, d_out): B_i^T
            a_w = (s * (a @ w.T)).view(n, r, -1)  # (n, r, d_out): s A_i W^T
            first, second = torch.triu_indices(n, n, offset=1, device=a.device)  # the pairs i < j
            gram = (s * s * (a @ a.T)).view(n, r, n, r).transpose(1, 2)  # (n, n, r, r): s^2 A_i A_j^T
            x_t = torch.cat([a_w, torch.bmm(gram[second, first], b_t[first])])
            y_t = torch.cat([b_t, b_t[second]])
        return x_t, y_t


class L1OfProducts(torch.autograd.Function):
    """sum_t |X_t Y_t^T|_1 for X^T (T, r, m), Y^T (T, r, n), with its gradient computed in the forward pass.

    The products are formed a few rows of every term at a time (at most CHUNK_ELEMENTS entries, or one
    row of each term) in `workspace`, and dropped; backward only scales the saved (T, r, m) and
    (T, r, n) gradients. The subgradient of |.| at 0 is 0.
    """

    @staticmethod
    def forward(ctx, x_t: torch.Tensor, y_t: torch.Tensor, workspace: torch.Tensor):
        terms, n = x_t.shape[0], y_t.shape[2]
        rows = max(1, CHUNK_ELEMENTS // (terms * n))
        if workspace.numel() < terms * rows * n or workspace.dtype != x_t.dtype:
            workspace = x_t.new_empty(terms * rows * n)
        grad_x, grad_y = torch.empty_like(x_t), torch.zeros_like(y_t)
        with torch.autocast(x_t.device.type, enabled=False):  # the sign pattern needs full precision
            for start in range(0, x_t.shape[2], rows):
                part = slice(start, start + rows)
                count = x_t[:, :, part].shape[2]
                sign = workspace[: terms * count * n].view(terms, count, n)  # rows of each P_t
                torch.bmm(x_t[:, :, part].transpose(1, 2), y_t, out=sign).sign_()
                grad_x[:, :, part] = torch.bmm(y_t, sign.transpose(1, 2))  # (T, r, rows)
                grad_y.baddbmm_(x_t[:, :, part], sign)  # (T, r, n)
        ctx.save_for_backward(grad_x, grad_y)
        return (grad_x * x_t).sum()  # <sign(P) Y, X> = <sign(P), X Y^T> = |P|_1

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_y = ctx.saved_tensors
        return grad * grad_x, grad * grad_y, None


def l1_of_products_reference(x_t: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """sum_t |X_t Y_t^T|_1 with every (m, n) product formed by autograd. What `L1OfProducts` computes."""
    return torch.bmm(x_t.transpose(1, 2), y_t).abs().sum()


def layer_penalty(layer: PEGOLinear, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """|W Delta W_i^T|_1 + sum_{j>i} |Delta W_i Delta W_j^T|_1 over the layer's group."""
    x_t, y_t = layer.penalty_factors()
    return L1OfProducts.apply(x_t, y_t, x_t.new_empty(0) if workspace is None else workspace)


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """The un-weighted PEGO penalty summed over every PEGO layer of the model."""
    layers = [m for m in adapter_layers(model).values() if isinstance(m, PEGOLinear)]
    if not layers:
        raise ConfigError("the model has no PEGO layers; apply a PEGOConfig first")
    # one scratch buffer for every layer's chunks: a fresh 2 MiB buffer per chunk fragmented the heap
    # (+70 MB of resident memory on the benchmark Llama, measured with VmHWM)
    most = max(max(CHUNK_ELEMENTS, layer.num_modules * (layer.num_modules + 1) // 2 * layer.lora_B.shape[0])
               for layer in layers)
    workspace = layers[0].lora_A.new_empty(most)
    return torch.stack([layer_penalty(layer, workspace) for layer in layers]).sum()


class PEGOSchedule(MethodSchedule):
    """Adds lambda * penalty to the loss (every `penalty_every`-th step, weighted by it)."""

    def __init__(self, model: nn.Module, cfg: PEGOConfig) -> None:
        super().__init__(model)
        self.weight, self.every = cfg.ortho_lambda, cfg.penalty_every
        self.steps_done = 0

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.weight == 0 or self.steps_done % self.every != 0:
            return None
        return (self.weight * self.every) * orthogonality_penalty(model)

    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.steps_done = step

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])


@register_schedule(PEGOConfig)
def make_schedule(model: nn.Module, cfg: PEGOConfig, total_steps: int | None) -> PEGOSchedule:
    """The per-step work of PEGO: its orthogonality penalty."""
    return PEGOSchedule(model, cfg)


@register(PEGOConfig)
def build(module: nn.Module, cfg: PEGOConfig, name: str) -> PEGOLinear | None:
    """PEGO wraps linear layers (nn.Linear, GPT-2 Conv1D); other matched modules are left alone."""
    return PEGOLinear(module, cfg) if weights.is_linear(module) else None
