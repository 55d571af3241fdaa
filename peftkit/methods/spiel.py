"""SpIEL: sparse fine-tuning whose trainable weight entries are periodically re-selected (Ansell, Vulić,
Sterz, Korhonen, Ponti, 2024, arXiv:2401.16405, "Scaling Sparse Fine-Tuning to Large Language Models").

    W = W0 + scatter(η, values),    y = x W^T + b,

per adapted linear layer: η holds k = round(density · d_out · d_in) flat indices into the canonical
(d_out, d_in) weight (an int64 buffer, kept sorted, saved with the adapter) and `values` their k deltas
(a Parameter, init 0: the model is unchanged at init; η starts as a uniformly random subset).
Trainable parameters: round(density · d_out · d_in) per layer. Merging is a scatter-add; unmerging
writes the entries saved at merge time back, so W0 returns bit for bit.

Re-selection (`SpIELSchedule`, which peftkit's training loop runs by itself; `peftkit.schedule_for` for
a plain loop). The selection windows are the `selection_accumulation_steps` = A optimizer steps ending
at steps A, R + A, 2R + A, ... (R = `reselection_steps`). In a window's first backward each layer keeps
the top-k positions of |dL/dW| as candidates; over the window it sums g and g² at them per optimizer
step. After the optimizer step that ends the window:
  drop the n = floor(k p) entries of η with the smallest |value|; grow the top-n candidates by |Σg| not
  among the kept entries; a position both dropped and grown stays (removed from both lists); regrown
  values are 0 and their Adam moments are seeded with bias counter-correction (below);
  p = 1 at the first re-selection, then p0 (1 - t/T) ("linear") or p0 (1 + cos(π t/T)) / 2 ("cosine").

Kernel (measured, CPU, 1 thread, 1024 tokens, density 1%, 384x1024 layer; shared noisy machine): the
forward is one `F.linear(x, W0 + scatter(values))` with the summed weight made on the fly (0.2 ms) and
never saved; backward re-makes it for dL/dx and computes dL/dvalues = (G^T X)[η] as a sampled product
(`torch.sparse.sampled_addmm`, 0.7-0.9 ms) instead of the dense weight gradient (8.6-9 ms GEMM).
Against the base layer's 17-19 ms of forward + dL/dx: about +14%. Rejected: base(x) plus a CSR
matmul (+2-7 ms forward, +1-2 ms dL/dx: ~+35%), gathering x at η and `index_add` into y (DSEE's
kernel, ~+250% at this k: (tokens, k) gathers), and autograd through the summed weight (the full dense
weight gradient every step, +50%). Memory outside selection windows is O(k) per layer: the summed weight
and the transposed activations are transients of one layer's forward or backward; inside a window one
dense (d_out, d_in) gradient exists per layer during its backward, as in the reference's selection hook.

Choices (methods.md 5.1 marks none UNVERIFIED; these are details the spec leaves open):
* The forward uses the base weight through `core.weights` (a quantized base is dequantized per step)
  rather than calling the base module; with bf16 compute, W0 + values is rounded to bf16 once, as in the
  reference's merged-weight forward.
* Statistics are per optimizer step (micro-batch gradients summed within a step), so n_s counts steps.
* Moment seeding for torch's AdamW, whose bias correction uses one step count t per tensor:
  exp_avg = (Σg/n_s)(1 - β1^t), exp_avg_sq = (Σg²/n_s)(1 - β2^t) (max_exp_avg_sq like exp_avg_sq), so the
  next bias-corrected moments start at the window means. The reference's optimizer keeps an age per entry.
* The reference re-selects after the optimizer step (a Trainer on_step_end callback); the schedule's hook
  runs before it, so it defers the re-selection to a one-shot `register_step_post_hook` on the optimizer.
* Under torch.distributed, rank 0's re-selection (from its share of the batch) is broadcast to all ranks.
* Not implemented: `num_tunable_weights` (use density = N / Σ d_out d_in) and the SM3 variant.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.layer import AdapterLayer
from ..core.registry import register
from .lora import adapter_dtype

DECAYS: dict[str, Callable[[float], float]] = {
    "linear": lambda frac: 1.0 - frac,
    "cosine": lambda frac: (1.0 + math.cos(math.pi * frac)) / 2.0,
}
"""Replacement-rate decay over training progress t/T in [0, 1] (multiplied by p0)."""


@dataclass
class SpIELConfig(AdapterConfig):
    """Sparse fine-tuning: k trainable entries per weight matrix, dropped and regrown during training."""

    method = "spiel"
    paper: ClassVar[str] = "Ansell et al. 2024, arXiv:2401.16405"
    trainable: ClassVar[str] = "round(density d_out d_in) per layer"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); every linear layer but the head by default."""

    density: float = 0.01
    """Share of each adapted matrix's entries that train: k = round(density d_out d_in)."""

    reselection_steps: int = 20
    """R: optimizer steps from one re-selection to the next."""

    selection_accumulation_steps: int = 5
    """A: optimizer steps whose gradients are accumulated for one re-selection (A <= R)."""

    initial_reselection_rate: float = 0.2
    """p0: share of the k entries replaced at the second re-selection, decaying after it (the first: all)."""

    reselection_decay: str = "linear"
    """How the replacement share decays with training progress: "linear" or "cosine"."""

    def validate(self) -> None:
        if isinstance(self.density, bool) or not isinstance(self.density, int | float) or not 0 < self.density <= 1:
            raise ConfigError(f"SpIEL density must be in (0, 1], got {self.density!r}")
        for name in ("reselection_steps", "selection_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.selection_accumulation_steps > self.reselection_steps:
            raise ConfigError(f"selection_accumulation_steps ({self.selection_accumulation_steps}) must not exceed "
                              f"reselection_steps ({self.reselection_steps}): a window lies within one period")
        if not 0.0 <= self.initial_reselection_rate <= 1.0:
            raise ConfigError(f"initial_reselection_rate must be in [0, 1], got {self.initial_reselection_rate}")
        if self.reselection_decay not in DECAYS:
            raise ConfigError(f"unknown reselection_decay {self.reselection_decay!r}; choose one of {', '.join(DECAYS)}")


class SpIELLinear(AdapterLayer):
    """A sparse delta on nn.Linear or GPT-2 Conv1D: k flat indices (buffer) and k values (Parameter)."""

    def __init__(self, base: nn.Module, density: float, name: str = "") -> None:
        super().__init__(base)
        w = weights.get_weight(base)
        self.d_out, self.d_in = w.shape
        k = round(density * w.numel())
        if k < 1:
            raise ConfigError(f"SpIEL density={density} leaves no trainable entry in {name or 'a layer'} "
                              f"({self.d_out}x{self.d_in} = {w.numel()} entries); use density >= {0.5 / w.numel():.2g}")
        self.sparse_values = nn.Parameter(torch.zeros(k, device=w.device, dtype=adapter_dtype(w)))
        self.register_buffer("sparse_index", torch.zeros(k, dtype=torch.long, device=w.device))
        self.gradient_observer: Callable[[torch.Tensor], None] | None = None
        """Set by the schedule during selection windows: receives each backward's dense dL/dW (d_out, d_in)."""
        self._pattern: tuple | None = None  # cached CSR rows of η, keyed by the index tensor's identity/version
        self._merged_from: torch.Tensor | None = None  # W0 at η, kept while merged for an exact unmerge

    @property
    def k(self) -> int:
        return self.sparse_values.numel()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.sparse_values.zero_()
            self.sparse_index.copy_(random_subset(self.d_out * self.d_in, self.k, self.sparse_index.device))

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.stacked():  # on another adapter: its output plus this sparse update (the kernel reads W0 itself)
            y = self.base(x, *args, **kwargs)
            delta = torch.zeros(self.d_out * self.d_in, dtype=self.sparse_values.dtype, device=x.device)
            delta = delta.index_put((self.sparse_index,), self.sparse_values).view(self.d_out, self.d_in)
            return y + torch.nn.functional.linear(x.to(delta.dtype), delta).to(y.dtype)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast once here; the Function runs with explicit dtypes
            with torch.autocast(device, enabled=False):
                x = x.to(torch.get_autocast_dtype(device))
                return SparseDeltaLinear.apply(x, self.sparse_values, self.sparse_index, self.bias, self)
        return SparseDeltaLinear.apply(x, self.sparse_values, self.sparse_index, self.bias, self)

    def summed_weight(self, values: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W0 + scatter(η, values) as a fresh dense (d_out, d_in) tensor in `dtype` (rounded once)."""
        w = torch.empty(self.d_out, self.d_in, dtype=dtype, device=values.device)
        w.copy_(weights.get_weight(self.base))
        flat = w.view(-1)
        flat.index_copy_(0, index, (flat[index].to(values.dtype) + values).to(dtype))
        return w

    def values_gradient(self, grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(G^T X)[η] for G (tokens, d_out), X (tokens, d_in); densely only inside a selection window."""
        dtype = torch.promote_types(self.sparse_values.dtype, torch.float32)  # sampled_addmm: no bf16
        if self.gradient_observer is not None:  # the re-selection needs the dense gradient anyway
            dense = grad.t().to(dtype) @ x.to(dtype)  # (d_out, d_in)
            self.gradient_observer(dense)
            return dense.view(-1)[index]
        crow, cols = self.pattern(index)
        g_rows = grad.t().to(dtype).contiguous()  # (d_out, tokens): sampled_addmm is fastest on row-major
        x_rows = x.t().to(dtype).contiguous()  # (d_in, tokens)   dot products of contiguous rows
        with warnings.catch_warnings():  # torch warns once that CSR tensors are "beta"; they are used read-only
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.sparse_csr_tensor(crow, cols, torch.zeros_like(index, dtype=dtype), (self.d_out, self.d_in),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(csr, g_rows, x_rows.t(), beta=0.0).values()

    def pattern(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR row pointers and column indices of the sorted flat indices η (cached until η changes)."""
        cached = self._pattern
        if cached is None or cached[0] is not index or cached[1] != index._version:
            rows = torch.bincount(index.div(self.d_in, rounding_mode="floor"), minlength=self.d_out)
            crow = torch.zeros(self.d_out + 1, dtype=torch.long, device=index.device)
            torch.cumsum(rows, 0, out=crow[1:])
            cached = self._pattern = (index, index._version, crow, index.remainder(self.d_in))
        return cached[2], cached[3]

    def delta_weight(self) -> torch.Tensor:
        """The dense ΔW, zero outside η (merging, tests; training never forms it)."""
        dense = torch.zeros(self.d_out * self.d_in, dtype=self.sparse_values.dtype, device=self.sparse_values.device)
        return dense.index_add(0, self.sparse_index, self.sparse_values).view(self.d_out, self.d_in)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        out = weight.contiguous().clone()
        self._merged_from = out.view(-1)[self.sparse_index].clone()
        out.view(-1).index_add_(0, self.sparse_index, self.sparse_values.detach().to(out.dtype))
        return out

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        out = weight.contiguous().clone()
        saved = self._merged_from
        if saved is None:  # merged by other means: subtract (exact up to rounding)
            saved = out.view(-1)[self.sparse_index] - self.sparse_values.detach().to(out.dtype)
        out.view(-1).index_copy_(0, self.sparse_index, saved.to(out.dtype))
        self._merged_from = None
        return out

    def extra_repr(self) -> str:
        return f"k={self.k}, density={self.k / (self.d_out * self.d_in):.4g}"


class SparseDeltaLinear(torch.autograd.Function):
    """y = x (W0 + scatter(η, values))^T + b, saving x, values and η only (no weight-sized tensor).

    b is an input (the base's own bias Parameter), so a bias trained alongside (BitFit) gets its gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None,
                layer: SpIELLinear):
        ctx.layer = layer
        ctx.save_for_backward(x, values, index)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, layer.summed_weight(values, index, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, values, index = ctx.saved_tensors
        layer: SpIELLinear = ctx.layer
        g2 = grad.reshape(-1, grad.shape[-1])  # (tokens, d_out)
        dx = dv = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ layer.summed_weight(values, index, grad.dtype)).view(x.shape)
        if ctx.needs_input_grad[1]:
            dv = layer.values_gradient(g2, x.reshape(-1, x.shape[-1]), index).to(values.dtype)
        if ctx.needs_input_grad[3]:
            dbias = g2.sum(0).to(ctx.bias_dtype)
        return dx, dv, None, dbias, None


def sparse_delta_reference(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, w0: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """y = x (W0 + scatter(η, values))^T + b with the summed weight formed by autograd (one dtype).
    What `SparseDeltaLinear` computes for a layer whose base holds w0 and bias."""
    delta = values.new_zeros(w0.numel()).index_put((index,), values).view(w0.shape)
    return F.linear(x, w0 + delta, bias)


def random_subset(numel: int, k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """k distinct sorted indices drawn uniformly from range(numel), in O(k) memory when k << numel."""
    if 2 * k > numel:
        return torch.randperm(numel, device=device)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long, device=device)
    while chosen.numel() < k:  # union of random draws; a random k of them is a uniform k-subset
        draw = torch.randint(numel, (2 * (k - chosen.numel()) + 16,), device=device)
        chosen = torch.unique(torch.cat([chosen, draw]))
    return chosen[torch.randperm(chosen.numel(), device=device)[:k]].sort().values


@register(SpIELConfig)
def build(module: nn.Module, cfg: SpIELConfig, name: str) -> SpIELLinear | None:
    """SpIEL wraps linear layers (nn.Linear, GPT-2 Conv1D); other matched modules are left alone."""
    return SpIELLinear(module, cfg.density, name) if weights.is_linear(module) else None
