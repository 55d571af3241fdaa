"""The SVD-form update the rank-budget family shares (AdaLoRA, IncreLoRA, TriAdaptLoRA).

    y = W0 x + b0 + s P diag(lambda) Q dropout(x),    s = alpha / (ranknum + 1e-5)

    P in R^{d_out x r} (peft: lora_B), lambda in R^r (lora_E, stored (r, 1)), Q in R^{r x d_in} (lora_A)

TriAdaptLoRA replaces diag(lambda) by a full r x r core C (`factors` then returns C in lambda's place).

(Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", arXiv:2303.10512.)
`ranknum` is a buffer: fixed at the initial rank for AdaLoRA, the current rank for IncreLoRA, so the
scale of a growing module shrinks as in that paper's code. Each rank-1 term P[:, i] lambda_i Q[i] is a
"triplet"; rank-budget schedules (`peftkit/schedules/rank_budget.py`) score triplets or modules and
switch them off (AdaLoRA: lambda_i = 0) or on (IncreLoRA/TriAdaptLoRA: more triplets in the forward).
A layer only says which triplets its forward uses (`factors`); it never decides the budget.

Forward cost: one (r, d_in) product Q * (s lambda) more than LoRA, then the shared in-place kernel
`lowrank.add_low_rank`; nothing weight-sized is formed. Merging folds s P (Q * lambda) into W0.
Linear layers and GPT-2 Conv1D only (as peft's AdaLoRA; its Conv2d variant is not provided).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core import weights
from ..core.layer import AdapterLayer
from .lora import adapter_dtype
from .lowrank import add_low_rank

INIT_STD = 0.02
"""P and Q start as N(0, 0.02^2) (AdaLoRA paper, peft, IncreLoRA code); lambda starts at 0."""


class SVDLayer(AdapterLayer):
    """Base of the SVD-form layers: scale, forward, merge and score capture, written once."""

    def __init__(self, base: nn.Module, alpha: float, dropout: float, ranknum: float) -> None:
        super().__init__(base)
        w = weights.get_weight(base)
        self.d_in, self.d_out = weights.in_out_features(base)
        self.factory = {"device": w.device, "dtype": adapter_dtype(w)}
        self.alpha = alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("ranknum", torch.tensor([float(ranknum)], **self.factory))
        self.capture_scores = False
        """Set by a schedule: accumulate |dW * dL/d(dW)| in `captured_score` during backward (IncreLoRA)."""
        self.captured_score: torch.Tensor | None = None

    # --- what a family member provides --------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q (r, d_in), core, P (d_out, r)) in the forward, unscaled; core: lambda (r, 1) or C (r, r)."""
        raise NotImplementedError

    # --- written once -------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        """s = alpha / (ranknum + 1e-5) as a tensor (a Python float would need a device sync)."""
        return self.alpha / (self.ranknum + 1e-5)

    def down_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s diag(lambda) Q or s C Q (r, d_in), P (d_out, r)): the update is their product."""
        q, core, p = self.factors()
        down = q * (core * self.scale()) if core.shape[1] == 1 else (core * self.scale()) @ q
        return down, p

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        down, up = self.down_up()
        x = self.dropout(x)
        out = add_low_rank(y, x, down, up, 1.0)  # y + P (s lambda * Q) x
        if self.capture_scores and out.requires_grad:
            out.register_hook(lambda grad: self._capture(x.detach(), grad))
        return out

    def delta_weight(self) -> torch.Tensor:
        down, up = self.down_up()
        return up @ down  # (d_out, d_in)

    @torch.no_grad()
    def _capture(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        """IncreLoRA's module score sum |dW * G| / sqrt(numel), G = dL/d(dW) = grad^T x; summed over micro-batches."""
        g = grad.reshape(-1, grad.shape[-1]).to(self.ranknum.dtype)  # (tokens, d_out)
        dw_grad = g.T @ x.reshape(-1, x.shape[-1]).to(g.dtype)  # (d_out, d_in)
        score = (self.delta_weight().to(g.dtype) * dw_grad).abs().sum() / dw_grad.numel() ** 0.5
        self.captured_score = score if self.captured_score is None else self.captured_score + score

    def take_score(self) -> torch.Tensor:
        """The score captured since the last call (0 when nothing was captured), then reset."""
        score = self.captured_score
        self.captured_score = None
        return torch.zeros((), **self.factory) if score is None else score.detach()

    def extra_repr(self) -> str:
        return f"triplets={self.factors()[0].shape[0]}, alpha={self.alpha:g}, ranknum={self.ranknum.item():g}"


def init_factors(q: torch.Tensor, p: torch.Tensor, lam: torch.Tensor, lam_value: float = 0.0) -> None:
    """The family's init: P, Q ~ N(0, 0.02^2) and lambda = lam_value (0: the model is unchanged)."""
    with torch.no_grad():
        nn.init.normal_(q, std=INIT_STD)
        nn.init.normal_(p, std=INIT_STD)
        lam.fill_(lam_value)


class RankGrowth:
    """What the rank-growing configs (IncreLoRA, TriAdaptLoRA) share: the step and capacity rules of their
    fields `rank_step`, `max_r` and `target_rank`."""

    def rank_step_value(self) -> int:
        """Rank a chosen module gains per growth event (None: target_rank // 2, as IncreLoRA's code)."""
        return self.rank_step if self.rank_step is not None else max(1, self.target_rank // 2)

    def max_r_for(self, d_in: int, d_out: int) -> int:
        """Capacity of a module of this shape (None: 4 x target_rank, at most min(d_in, d_out))."""
        return self.max_r if self.max_r is not None else min(4 * self.target_rank, d_in, d_out)
