"""Elementwise operators on task tensors (a LoRA factor, a delta weight ΔW = s B A, any τ = θ_ft − θ_pre).

DARE (Yu et al., 2023, arXiv:2311.03099): drop each entry with probability p = 1 − density and rescale
the survivors,

    δ̂ = m ⊙ δ / (1 − p),   m ~ Bernoulli(1 − p)  elementwise,   E[δ̂] = δ,   Var[δ̂_i] = δ_i² p / (1 − p).

DAREx-q (Deng et al., 2024, "DARE the Extreme", arXiv:2410.09344) replaces 1/(1 − p) by 1/q: at high p
the factor 1/(1 − p) is huge and the output change (δ̂ − δ) x has a large variance; a q > 1 − p shrinks
on purpose (E[δ̂] = (1 − p)/q · δ). `data_free_scale` picks 1/q per layer from unlabelled layer inputs X
(n, d_in) in closed form:

    c* = argmin_c ‖δ Xᵀ − c (m ⊙ δ) Xᵀ‖²  =  ⟨δ Xᵀ, (m ⊙ δ) Xᵀ⟩ / ‖(m ⊙ δ) Xᵀ‖²,   q = 1 / c*.

TIES (Yadav et al., 2023, arXiv:2306.01708): keep the top-density magnitudes of each task tensor, elect
a sign per entry, average the entries that agree with it (`majority_sign_mask`, `disjoint_mean`).

The functions follow Hugging Face peft's `utils/merge_utils.py` conventions (density = kept fraction,
k = int(density · numel) for magnitude pruning, sign ties to +1), so combinations agree with
`add_weighted_adapter`.
"""

from __future__ import annotations

import torch


def dare(t: torch.Tensor, density: float, q: float | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """m ⊙ t / q with m ~ Bernoulli(density) elementwise; q = density (plain DARE) unless given (DAREx-q).

    Args:
        t: any task tensor.
        density: kept fraction 1 − p, in (0, 1]; 1 returns `t` unchanged (no mask is drawn).
        q: rescale denominator; None gives DARE's 1/density.
        generator: the random stream of the mask (torch's global one when None, as peft).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the kept fraction 1 - drop rate), got {density}")
    if density == 1.0:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / (density if q is None else q)


def dare_mask(t: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The 0/1 mask `dare` multiplies by (same draw for the same generator state)."""
    if density == 1.0:
        return torch.ones_like(t)
    return torch.bernoulli(torch.full_like(t, density), generator=generator)


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density · numel) entries of largest |t|, zero the rest (density >= 1: unchanged)."""
    if density >= 1.0:
        return t
    if density < 0.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    flat, k = t.reshape(-1), int(density * t.numel())
    if k == 0:
        return torch.zeros_like(t)
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, flat.numel() - k + 1).values  # the k-th largest: ~4x faster than topk
    keep = magnitude >= threshold
    if int(keep.sum()) != k:  # ties at the threshold: exactly k entries, as topk picks them
        keep = torch.zeros_like(keep)
        keep[torch.topk(magnitude, k=k, largest=True).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(t)


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Entries whose sign agrees with the elected one; task tensors stacked on dim 0.

    "total": the sign of Σ_i t_i; "frequency": the sign most of the t_i have; a tie elects +1.
    """
    sign = stacked.sign()
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown majority_sign_method {method!r}; use 'total' or 'frequency'")
    return sign == torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Σ_i agree_i ⊙ w_i t_i / max(1, Σ_i agree_i): the mean over the tensors that agree with the elected sign."""
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def data_free_scale(delta: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """c* = ⟨δ Xᵀ, δ̂ Xᵀ⟩ / ‖δ̂ Xᵀ‖², the scalar that makes c·δ̂ change the layer's outputs least (1/q of DAREx-q).

    Args:
        delta: the layer's delta weight δ, (d_out, d_in).
        pruned: the masked delta m ⊙ δ, not rescaled, (d_out, d_in).
        x: unlabelled inputs of the layer, (n, d_in).
    """
    if x.dim() != 2 or x.shape[1] != delta.shape[1]:
        raise ValueError(f"layer inputs must be (n, d_in={delta.shape[1]}), got {tuple(x.shape)}")
    x = x.to(delta.dtype)
    y, y_hat = x @ delta.T, x @ pruned.T  # (n, d_out)
    norm = float((y_hat * y_hat).sum())
    return float((y * y_hat).sum()) / norm if norm > 0 else 1.0
