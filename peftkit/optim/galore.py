"""GaLoreAdamW: AdamW whose moments live in a low-rank projection of each marked weight's gradient.

GaLore (Zhao et al., 2024, arXiv:2403.03507), for each 2-D weight W ∈ R^{m×n} of a group with a `rank`:

    every T steps (t = 0, T, 2T, ...):  P ← top-r singular vectors of G_t   (see `projection.py`)
    R_t = G_t Pᵀ (or Pᵀ G_t)                                                (m×r or r×n)
    m_t = β₁ m + (1−β₁) R_t,   v_t = β₂ v + (1−β₂) R_t²,   N_t = m̂_t / (√v̂_t + ε)
    W ← (1 − ηλ) W − η α (N_t P  or  P N_t)

Natural GaLore (Das, 2024, arXiv:2410.16029), `natural=True`: R_t is replaced by F̂⁻¹ vec(R_t) before the
moments, F̂ = λ_F I + Hᵀ H over the last s projected gradients H (the current one included), applied by
Woodbury without forming a k×k matrix. As in the authors' code, the moments and the gradient history
carry over when P is refreshed (they are then read in the new basis).

Groups without `rank` (the default) are plain AdamW, with torch.optim.AdamW's arithmetic (decay first,
ε added to √v̂); with r = min(m, n), α = 1 and P = I a projected weight takes AdamW's step. Every state
value is a tensor or a plain number, so `state_dict()` goes through peftkit's safetensors checkpoints
and a resumed run equals an uninterrupted one. galore-torch's GaLoreAdamW differs only in ε (added to √v,
the Hugging Face convention) and in decaying after the update; with λ = 0 and a small ε the two agree.

Usage (a plain loop)::

    opt = GaLoreAdamW(galore_param_groups(model, rank=64, update_proj_gap=200, scale=0.25), lr=1e-3)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .projection import (
    BASES,
    SIDES,
    add_projected_back,
    natural_transform,
    orthogonal_basis,
    project,
    projection_side,
)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore (or Natural GaLore) projection for the param groups that set `rank`.

    Args:
        params: parameters or groups; a group with `rank` (int) is projected, others are plain AdamW.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (η, (β₁, β₂), ε, λ).
        rank: default r for groups (None: groups are plain unless they set their own `rank`).
        update_proj_gap: T, steps between refreshes of P (GaLore's default 200).
        scale: α, the factor on the projected-back update (GaLore's default 0.25).
        proj_type: "std" (right projection when m ≥ n, else left), "left" or "right".
        natural: Natural GaLore: precondition R by the Woodbury inverse empirical Fisher.
        history_size: s, the number of projected gradients in the Fisher (20).
        damping: λ_F of F̂ = λ_F I + Hᵀ H (1e-3).
        svd: how P is found: "svd" (thin SVD, GaLore's and galore-torch's) or "gram" (top eigenvectors of
            the smaller Gram matrix: the same subspace, faster on tall matrices; see `orthogonal_basis`).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, rank: int | None = None,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 natural: bool = False, history_size: int = 20, damping: float = 1e-3, svd: str = "svd") -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW hyperparameters lr={lr}, betas={betas}, eps={eps}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type,
                    "natural": natural, "history_size": history_size, "damping": damping, "svd": svd}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group (defaults filled in), then refuse what GaLore cannot project, before any step."""
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step; projected groups refresh P at steps 0, T, 2T, ... (counted per parameter)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                if group["rank"] is None:
                    self._adamw_step(p, group)
                else:
                    self._galore_step(p, group)
        return loss

    def _adamw_step(self, p: torch.Tensor, group: dict) -> None:
        """torch.optim.AdamW's single-tensor update, the same operations in the same order."""
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        lr, (beta1, beta2), grad = group["lr"], group["betas"], p.grad
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size, denom = _adam_denominator(state, group)
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)

    def _galore_step(self, p: torch.Tensor, group: dict) -> None:
        """Project G, (Natural GaLore: precondition,) Adam in the subspace, project the update back into p."""
        state, grad = self.state[p], p.grad
        side = projection_side(p.shape, group["proj_type"])
        if not state:
            state["step"] = 0
        if state["step"] % group["update_proj_gap"] == 0:
            state["projection"] = orthogonal_basis(grad, group["rank"], side, group["svd"])
        low = project(grad, state["projection"], side)  # (m, r) right, (r, n) left
        if group["natural"]:
            low = self._natural(state, low, group)
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
        state["step"] += 1
        lr, (beta1, beta2) = group["lr"], group["betas"]
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(low, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(low, low, value=1 - beta2)
        step_size, denom = _adam_denominator(state, group)
        normalized = torch.div(state["exp_avg"], denom, out=denom)  # N = m / (√v̂ + ε), reusing denom
        add_projected_back(p, normalized, state["projection"], side, alpha=-step_size * group["scale"])

    @staticmethod
    def _natural(state: dict, low: torch.Tensor, group: dict) -> torch.Tensor:
        """F̂⁻¹ vec(R) over a FIFO of the last s projected gradients (state: "history", its Gram matrix, a count)."""
        size = group["history_size"]
        if "history" not in state:
            state["history"] = low.new_zeros(size, low.numel())  # (s, k)
            state["history_gram"] = low.new_zeros(size, size)  # H Hᵀ, (s, s)
            state["history_count"] = 0
        count = state["history_count"]
        out = natural_transform(low, state["history"], state["history_gram"], min(count + 1, size), count % size,
                                group["damping"])
        state["history_count"] = count + 1
        return out


def _adam_denominator(state: dict, group: dict) -> tuple[float, torch.Tensor]:
    """(η / (1 − β₁ᵗ), √v / √(1 − β₂ᵗ) + ε), as torch.optim.AdamW computes them."""
    beta1, beta2 = group["betas"]
    step = state["step"]
    denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
    return group["lr"] / (1 - beta1**step), denom


def _check_group(group: dict) -> None:
    """Refuse, before any step, a projected group that holds a parameter GaLore cannot project."""
    if group["rank"] is None:
        return
    if group["proj_type"] not in SIDES:
        raise ValueError(f"proj_type {group['proj_type']!r} is not one of {SIDES}")
    if group["svd"] not in BASES:
        raise ValueError(f"svd {group['svd']!r} is not one of {BASES}")
    if int(group["rank"]) < 1 or int(group["update_proj_gap"]) < 1 or int(group["history_size"]) < 1:
        raise ValueError("rank, update_proj_gap and history_size must be positive integers, got "
                         f"{group['rank']}, {group['update_proj_gap']}, {group['history_size']}")
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(
                f"GaLore projects 2-D weights only, but a parameter of shape {tuple(p.shape)} is in a group "
                "with rank set; put it in a group without `rank` (plain AdamW), e.g. with "
                "galore_param_groups(model, rank=...), which does this for you"
            )


def galore_param_groups(model_or_params: nn.Module | Iterable[torch.Tensor], rank: int,
                        update_proj_gap: int = 200, scale: float = 0.25, **projected) -> list[dict]:
    """Two param groups: the trainable 2-D weights, projected with `rank`, and the rest as plain AdamW.

    Args:
        model_or_params: a module (its parameters with requires_grad) or an iterable of parameters.
        rank, update_proj_gap, scale: r, T and α of the projected group.
        **projected: further keys of the projected group (proj_type, natural, history_size, damping, lr ...).
    """
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    seen: set[int] = set()
    matrices, rest = [], []
    for p in params:
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (matrices if p.dim() == 2 else rest).append(p)
    groups = [{"params": matrices, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, **projected}]
    return groups + ([{"params": rest, "rank": None}] if rest else [])
