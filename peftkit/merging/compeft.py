"""ComPEFT: compress an adapter by sparsifying and ternarizing its task vector, no retraining.

Yadav et al., 2023, "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization" (arXiv:2311.13171). Per adapter tensor φ:

    τ = φ_ft − φ_init                           the tensor's task vector
    M = top-k% of |τ|  (nnz(M) = ⌈k · numel⌉)   sparsify
    τ̃ = α · σ(τ) · sign(τ) ⊙ M                  ternarize: σ = std of the ORIGINAL τ, α a tuned scalar
    φ = φ_init + τ̃

so each tensor is one scalar α·σ, a support and a sign per support entry; peftkit stores it that way
(core/packed.py: bitmap or Golomb-Rice positions, packed sign bits, the scalar in the JSON).

What φ_init is here: 0 for every tensor, i.e. τ = φ (the adapter's tensors are compressed themselves).
For LoRA's B (initialised at zero) and for bottleneck up-projections, prompt offsets and the like this
is exactly the paper's task vector. LoRA's A starts at a random init that the adapter file does not
record (it was drawn from the run's RNG), so φ_init cannot be rebuilt at load time; compressing A as
it is keeps the file self-contained. Methods whose tensors start at a non-zero constant ((IA)³'s 1s,
SSF's scale) are NOT handled faithfully by this choice: compress only their zero-initialised tensors
(`exclude` the others) or expect a large loss. σ is torch's Bessel-corrected std; a tensor of fewer
than 2 entries has none and is kept as it is.
"""

from __future__ import annotations

import math
import os

import torch

from ..core.config import AdapterConfig, ConfigError
from .combine import read_values

Adapter = tuple[AdapterConfig, dict, dict[str, torch.Tensor]]


def top_k_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ⌈density · numel⌉ entries of largest |τ| (ties broken by torch.topk)."""
    count = math.ceil(density * tau.numel())
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    mask[torch.topk(tau.abs().reshape(-1), count, sorted=False).indices] = True
    return mask.reshape(tau.shape)


def ternarize(tau: torch.Tensor, mask: torch.Tensor, magnitude: torch.Tensor | float) -> torch.Tensor:
    """magnitude · sign(τ) ⊙ M; with the scalar α·σ(τ) it is ComPEFT's τ̃, with |τ| it gives τ ⊙ M back."""
    return (magnitude * torch.sign(tau) * mask).to(tau.dtype)


def compeft(tau: torch.Tensor, density: float, alpha: float) -> torch.Tensor:
    """τ̃ = α · σ(τ) · sign(τ) ⊙ top-k(|τ|): three distinct values {−ασ, 0, +ασ} in τ's dtype."""
    sigma = tau.float().std()
    scale = (alpha * sigma).to(tau.dtype)  # rounded to the dtype once, so every kept entry is exactly ±scale
    return ternarize(tau, top_k_mask(tau, density), scale)


def compress(adapter: Adapter | str | os.PathLike, how: str = "compeft", *, density: float = 0.1,
             alpha: float = 1.0, exclude: list[str] | tuple[str, ...] = ()) -> Adapter:
    """A compressed copy of an adapter, as a value `(config, meta, tensors)`, which `write_adapter` stores compactly.

    Args:
        adapter: `(config, meta, tensors)` as `core.io.read_adapter` returns it, or an adapter directory.
        how: "compeft" (the only scheme so far).
        density: k, the kept fraction of each tensor's entries, in (0, 1].
        alpha: α, the multiplier of σ(τ); the paper tunes it on a small validation set.
        exclude: tensors whose key contains one of these strings stay dense and exact (e.g. "classifier"
            for a task head trained from a random init).

    The returned tensors are dense, each exactly ternary; `meta["pack_ternary"]` lists the ones
    `write_adapter` stores as positions + signs + scalar, and `meta["compression"]` records how.
    """
    if how != "compeft":
        raise ConfigError(f"unknown compression {how!r}; use how='compeft'")
    if not (isinstance(density, int | float) and 0 < density <= 1):
        raise ConfigError(f"density must be in (0, 1] (the kept fraction, e.g. 0.1), got {density!r}")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a finite number > 0 (e.g. 1.0), got {alpha!r}")
    config, meta, tensors = read_values(adapter) if isinstance(adapter, str | os.PathLike) else adapter
    out, packed = {}, []
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() >= 2 and not any(e in key for e in exclude):
            out[key] = compeft(t.detach(), density, alpha)
            packed.append(key)
        else:
            out[key] = t.detach().clone()
    if not packed:
        raise ConfigError("no tensor to compress: every tensor is excluded, not floating point, or a scalar")
    meta = {k: v for k, v in meta.items() if k in ("base_model", "base_fingerprint")}
    meta["pack_ternary"] = sorted(packed)
    meta["compression"] = {"how": how, "density": density, "alpha": alpha, "exclude": list(exclude)}
    return config, meta, out


def compression_ratio(tensors: dict[str, torch.Tensor], compressed: dict[str, torch.Tensor], keys: list[str]) -> float:
    """Dense bytes of the whole adapter over its bytes when `keys` are stored packed (from bit counts).

    A packed tensor costs its position code (the smaller of a numel-bit bitmap and the Golomb-Rice
    code), nnz sign bits and a 64-bit scalar, each rounded up to whole bytes; the other tensors cost
    their dense size. Safetensors and JSON headers are not counted (a few KiB per file).
    """
    from ..core.packed import pack_ternary

    dense = sum(t.numel() * t.element_size() for t in tensors.values())
    small = sum(t.numel() * t.element_size() for k, t in compressed.items() if k not in keys)
    for key in keys:
        positions, signs, _ = pack_ternary(compressed[key])
        small += positions.size + signs.size + 8
    return dense / small
