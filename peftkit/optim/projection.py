"""GaLore's projector and Natural GaLore's Woodbury transform, as plain functions on tensors.

GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
arXiv:2403.03507) keeps a weight's Adam moments in an r-dimensional subspace of its gradient
`G ∈ R^{m×n}`, found every T steps from the SVD `G = U Σ Vᵀ`:

    m ≥ n (right):  P = V[:, :r]ᵀ ∈ R^{r×n},   R = G Pᵀ ∈ R^{m×r},   back: N P
    m < n (left):   P = U[:, :r]   ∈ R^{m×r},   R = Pᵀ G ∈ R^{r×n},   back: P N

so the moments hold r·max(m, n) numbers each and P holds r·min(m, n).

Natural GaLore (Das, 2024, "Natural GaLore: Accelerating GaLore for memory-efficient LLM training and
fine-tuning", arXiv:2410.16029) preconditions `g = vec(R) ∈ R^k` with the inverse of an empirical Fisher
over the last s projected gradients `H ∈ R^{s×k}` (rows, the newest included), applied by Woodbury:

    F̂ = λ I_k + Hᵀ H,   F̂⁻¹ g = λ⁻¹ g − λ⁻² Hᵀ (I_s + λ⁻¹ H Hᵀ)⁻¹ H g

with the s×s system solved by Cholesky, so only O(k·s) memory is used and no k×k matrix is formed.
"""

from __future__ import annotations

import torch

SIDES = ("std", "left", "right")
BASES = ("svd", "gram")
"""How P is computed: the thin SVD (GaLore's, the default) or eigenvectors of the smaller Gram matrix."""
"""proj_type values: "std" projects the longer side away (right when m ≥ n, as GaLore does)."""


def projection_side(shape: torch.Size | tuple[int, ...], proj_type: str) -> str:
    """"right" or "left": which factor of the SVD projects a gradient of this (m, n) shape."""
    if proj_type not in SIDES:
        raise ValueError(f"proj_type {proj_type!r} is not one of {SIDES}")
    if proj_type != "std":
        return proj_type
    return "right" if shape[0] >= shape[1] else "left"


def orthogonal_basis(grad: torch.Tensor, rank: int, side: str, method: str = "svd") -> torch.Tensor:
    """P from the top-r singular vectors of `grad`: (r, n) rows of Vᵀ for "right", (m, r) columns of U for "left".

    "svd": the thin SVD (`full_matrices=False`, O(mn·min(m, n))) in fp32, as GaLore computes it, so the basis
    equals galore-torch's bit for bit. "gram": the top eigenvectors of the Gram matrix of the projected side,
    GᵀG (n×n) for "right" or GGᵀ (m×m) for "left", formed by one fp32 GEMM and decomposed in fp64: the same
    subspace (each vector up to its sign) several times faster on tall matrices such as an embedding; the
    squared condition number costs accuracy only in the small singular directions, which P drops.
    """
    matrix = grad.float()
    if method == "gram":
        gram = matrix.T @ matrix if side == "right" else matrix @ matrix.T
        top = torch.linalg.eigh(gram.double())[1][:, -rank:].flip(1).float()  # (side, r), largest first
        basis = top.T if side == "right" else top
    else:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        basis = vh[:rank] if side == "right" else u[:, :rank]
    return basis.to(grad.dtype).contiguous()


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """R = G Pᵀ (m, r) for "right", Pᵀ G (r, n) for "left"."""
    return grad @ basis.T if side == "right" else basis.T @ grad


def add_projected_back(param: torch.Tensor, low: torch.Tensor, basis: torch.Tensor, side: str, alpha: float) -> None:
    """param += alpha · (N P or P N), in one GEMM into the parameter: no (m, n) temporary is allocated."""
    if side == "right":
        param.addmm_(low, basis, alpha=alpha)  # (m, r) @ (r, n)
    else:
        param.addmm_(basis, low, alpha=alpha)  # (m, r) @ (r, n)


def woodbury_inverse_fisher(history: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    """F̂⁻¹ g with F̂ = λ I + Hᵀ H, for history rows `H` (s, k) and a vector `g` (k,), by Woodbury.

    Cost O(k·s²) time and O(k·s) memory: the only square matrix is the s×s `I + λ⁻¹ H Hᵀ`.
    """
    return _woodbury(history, g, history @ history.T, history @ g, damping)


def _woodbury(history: torch.Tensor, g: torch.Tensor, gram: torch.Tensor, hg: torch.Tensor, damping: float):
    """λ⁻¹ g − λ⁻² Hᵀ (I + λ⁻¹ gram)⁻¹ hg, given gram = H Hᵀ (s, s) and hg = H g (s,); Cholesky on s×s."""
    inv = 1.0 / damping
    inner = gram * inv
    inner.diagonal().add_(1.0)
    factor = torch.linalg.cholesky(inner)
    coeff = torch.cholesky_solve(hg.unsqueeze(1), factor).squeeze(1)  # (s,)
    return (g * inv).sub_(history.T @ coeff, alpha=inv * inv)


def natural_transform(low: torch.Tensor, ring: torch.Tensor, gram: torch.Tensor, filled: int, slot: int,
                      damping: float) -> torch.Tensor:
    """Write vec(R) into the FIFO ring (s, k) at `slot`, then return F̂⁻¹ vec(R) over the filled rows, shaped as R.

    The order of the rows does not matter (Hᵀ H is a sum over them), so a ring buffer stands for the FIFO.
    `gram` (s, s) caches H Hᵀ: only the new row's products change, and they are H g, which the right-hand
    side needs anyway, so a step costs O(k·s) rather than the O(k·s²) of recomputing H Hᵀ. In bf16/fp16
    the products are recomputed in fp32 every step instead (a half-precision H Hᵀ can lose definiteness).
    """
    g = low.reshape(-1)
    ring[slot].copy_(g)
    history = ring[:filled]
    if ring.dtype in (torch.bfloat16, torch.float16):  # Cholesky needs fp32: recompute rather than cache
        history, g = history.float(), g.float()
        return woodbury_inverse_fisher(history, g, damping).to(low.dtype).view_as(low)
    hg = history @ g  # (filled,)
    gram[slot, :filled] = hg
    gram[:filled, slot] = hg
    return _woodbury(history, g, gram[:filled, :filled], hg, damping).view_as(low)
