"""Combine several LoRA adapters into one: `combine(adapters, weights, how=...)`, a pure function.

An adapter is a value `(config, meta, tensors)` as `core.io.read_adapter` returns it (or a directory),
with tensors `<module>.lora_A` (r, d_in) and `<module>.lora_B` (d_out, r), delta ΔW = s B A. The result
is such a value with scaling 1 (alpha = r, peft does the same), for `core.io.write_adapter`.

Modes (those of Hugging Face peft's `add_weighted_adapter`, same names and, seeds aside, same results):

* factor space, rank r kept (every adapter must have the same r): each of A and B is a task tensor,
  weighted by √|w_i s_i| (the sign on A), so the product carries w_i s_i:
  `linear` (Σ_i of each factor: cheap, an approximation, the cross terms B_i A_j stay), `ties`,
  `dare_linear`, `dare_ties`, `magnitude_prune`;
* `cat`: A' = [w_1 s_1 A_1; ...], B' = [B_1, ...]: B' A' = Σ_i w_i ΔW_i exactly, rank Σ r_i;
* delta space, then a truncated SVD to `svd_rank` (default: the largest r): ΔW' = op_i(w_i ΔW_i) = U S Vᵀ,
  B' = U S, A' = Vᵀ: `svd` (task arithmetic; computed on the factors with two QRs, never forming ΔW),
  `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`.

DAREx-q (prune.py): the `dare_*` modes take `q`, the rescale 1/q instead of 1/density: a number, or
"data-free" with `inputs={module: X (n, d_in)}` (unlabelled layer inputs, e.g. from
`peftkit.train.layer_inputs.collect_layer_inputs`) for a closed-form q per layer and adapter; in factor
space both factors get 1/q with 1/q² the least-squares scale of the product (a layer whose
least-squares scale is negative gets 0: the nearest the product's scale 1/q² can be). `tune_q` picks one q on
a validation score. Masks are drawn from a generator seeded by `seed` (torch's global stream when
None), per module in the tensors' order, all A's then all B's, as peft draws them.

Only LoRA's A/B form is supported: (IA)³ and other multiplicative or non-additive updates do not add
up under a weighted sum, DoRA renormalises by the column norm, and PiSSA/OLoRA adapters hold a base
residual; each is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import torch

from ..core.io import adapter_format, read_adapter
from .compatible import CombineError, check_call
from .prune import dare_mask, data_free_scale, disjoint_mean, magnitude_prune, majority_sign_mask

Adapter = tuple  # (config, meta, tensors)
FACTOR_MODES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DELTA_MODES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
MODES = (*FACTOR_MODES, "cat", *DELTA_MODES)
"""Every `how` that `combine` accepts."""

def combine(adapters: Sequence, weights: Sequence[float], how: str = "linear", *, density: float = 1.0,
            majority_sign_method: str = "total", svd_rank: int | None = None, q: float | str | None = None,
            inputs: dict[str, torch.Tensor] | None = None, seed: int | None = 0,
            allow_different_base: bool = False) -> Adapter:
    """One LoRA adapter from several: (config, meta, tensors), writable by `core.io.write_adapter`.

    Args:
        adapters: directories or `(config, meta, tensors)` values; one method, the same targets and modules.
        weights: one weight per adapter (negative subtracts).
        how: one of `MODES` (module docstring).
        density: kept fraction for the ties / dare / magnitude_prune modes.
        majority_sign_method: "total" or "frequency" (ties modes).
        svd_rank: rank of the `*svd` results (default: the largest input rank per module).
        q: DAREx-q rescale for dare modes: None (DARE: 1/density), a number in (0, 1], or "data-free".
        inputs: {module name: X (n, d_in)} for q="data-free".
        seed: seed of the masks (None: torch's global generator, as peft).
        allow_different_base: combine adapters whose base fingerprints differ.
    """
    values = [read_values(a) if isinstance(a, str | os.PathLike) else tuple(a) for a in adapters]
    check_call(values, weights, how, MODES, {"density": density, "majority_sign_method": majority_sign_method,
               "q": q, "inputs": inputs, "svd_rank": svd_rank}, allow_different_base)
    config, meta, tensors0 = values[0]
    modules = [k[: -len(".lora_A")] for k in tensors0 if k.endswith(".lora_A")]
    gen = None if seed is None else torch.Generator(tensors0[modules[0] + ".lora_A"].device).manual_seed(seed)
    opts = {"density": density, "sign": majority_sign_method, "q": q, "gen": gen}
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name in modules:
        factors = [(t[name + ".lora_A"], t[name + ".lora_B"], c.scaling_for(name)) for c, _, t in values]
        x = None if q != "data-free" else _inputs_for(inputs, name)
        a, b = _combine_module(how, factors, [float(w) for w in weights], svd_rank, x, opts)
        dtype = factors[0][0].dtype
        out[name + ".lora_A"], out[name + ".lora_B"] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        ranks[name] = a.shape[0]
    out.update(_carried_tensors(values))
    meta = {"base_model": meta.get("base_model"), "base_fingerprint": meta.get("base_fingerprint", {}),
            "combined": {"how": how, "weights": [float(w) for w in weights], "density": density}}
    return _result_config(config, ranks), meta, out


def read_values(directory: str | os.PathLike) -> Adapter:
    """An adapter directory as a value: peftkit's, or a plain LoRA that Hugging Face peft saved."""
    if adapter_format(directory) == "peft":
        from ..core.peft_format import read_peft_values

        return read_peft_values(directory)
    return read_adapter(directory)


def _combine_module(how, factors, weights, svd_rank, x, opts) -> tuple[torch.Tensor, torch.Tensor]:
    if how == "cat":  # written into the result directly: no scaled copies held next to it
        a = torch.cat([a.float() for a, _, _ in factors])
        offset = 0
        for (part, _, s), w in zip(factors, weights, strict=True):
            a[offset : offset + part.shape[0]].mul_(w * s)
            offset += part.shape[0]
        return a, torch.cat([b.float() for _, b, _ in factors], dim=1)
    if how in FACTOR_MODES:
        return _factor_space(how, factors, weights, x, opts)
    rank = svd_rank or max(a.shape[0] for a, _, _ in factors)
    if how == "svd":
        return _low_rank_svd(factors, weights, rank)
    deltas = [s * (b.float().flatten(1) @ a.float().flatten(1)) for a, b, s in factors]  # (d_out, d_in·k·k)
    kept = [_sparsify(how, d, opts) for d in deltas]
    if x is not None:
        kept = [(m, data_free_scale(d, m, x)) for d, (m, _) in zip(deltas, kept, strict=True)]
    delta = _reduce(how, [m * c for m, c in kept], weights, opts["sign"])
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    a0, b0 = factors[0][0], factors[0][1]
    b = (u[:, :rank] * s[:rank]).reshape(b0.shape[0], -1, *b0.shape[2:])
    return vh[:rank].reshape(-1, *a0.shape[1:]), b


def _factor_space(how, factors, weights, x, opts) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's factor-space modes: A' = op_i(sign·√|w_i s_i| A_i), B' = op_i(√|w_i s_i| B_i)."""
    roots = [math.sqrt(abs(w * s)) for (_, _, s), w in zip(factors, weights, strict=True)]
    signs = [1.0 if w * s >= 0 else -1.0 for (_, _, s), w in zip(factors, weights, strict=True)]
    a_weights = [r * g for r, g in zip(roots, signs, strict=True)]
    if x is None and "ties" not in how:  # a running sum: one pruned factor alive at a time (all A masks first, as peft)
        return (_streamed_sum(how, [a for a, _, _ in factors], a_weights, opts),
                _streamed_sum(how, [b for _, b, _ in factors], roots, opts))
    kept_a = [_sparsify(how, a.float(), opts) for a, _, _ in factors]  # all A masks, then all B masks
    kept_b = [_sparsify(how, b.float(), opts) for _, b, _ in factors]
    if x is not None:  # DAREx-q data-free: 1/q on each factor, 1/q² the least-squares scale of the product
        for i, (a, b, _) in enumerate(factors):
            c = data_free_scale(b.float() @ a.float(), kept_b[i][0] @ kept_a[i][0], x)
            kept_a[i] = kept_a[i][0], math.sqrt(max(c, 0.0))
            kept_b[i] = kept_b[i][0], math.sqrt(max(c, 0.0))
    return _reduce_scaled(how, kept_a, a_weights, opts["sign"]), _reduce_scaled(how, kept_b, roots, opts["sign"])


def _streamed_sum(how: str, tensors: list[torch.Tensor], weights: list[float], opts: dict) -> torch.Tensor:
    out = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for t, w in zip(tensors, weights, strict=True):
        kept, c = _sparsify(how, t.float(), opts)
        out.add_(kept, alpha=float(w * c))
    return out


def _reduce_scaled(how: str, kept: list[tuple[torch.Tensor, float]], weights: list[float], sign_method: str):
    """`_reduce` of the tensors m_i c_i; outside ties modes accumulated in place, so that no stack of the
    n scaled copies is ever held (what kept the factor-space modes' peak above peft's)."""
    if "ties" in how:
        return _reduce(how, [m * c for m, c in kept], weights, sign_method)
    out = torch.zeros_like(kept[0][0])
    for (m, c), w in zip(kept, weights, strict=True):
        out.add_(m, alpha=float(w * c))
    return out


def _sparsify(how: str, t: torch.Tensor, opts: dict) -> tuple[torch.Tensor, float]:
    """(kept entries, rescale): magnitude top-k for ties/magnitude_prune, a DARE mask and 1/q for dare."""
    if how.startswith("dare"):
        if opts["density"] >= 1.0:
            return t, 1.0
        q = opts["q"] if isinstance(opts["q"], float | int) else opts["density"]
        return t * dare_mask(t, opts["density"], opts["gen"]), 1.0 / q
    if how.startswith(("ties", "magnitude_prune")):
        return magnitude_prune(t, opts["density"]), 1.0
    return t, 1.0


def _reduce(how: str, tensors: list[torch.Tensor], weights: list[float], sign_method: str) -> torch.Tensor:
    """Σ_i w_i t_i, or for ties modes the disjoint mean over the entries agreeing with the elected sign."""
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if "ties" in how:  # the sign is elected on the unweighted tensors, as peft does
        return disjoint_mean(stacked * w, majority_sign_mask(stacked, sign_method))
    return (stacked * w).sum(dim=0)


def _low_rank_svd(factors, weights, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of Σ_i w_i s_i B_i A_i from the stacked factors: B_c = Q_b R_b, A_cᵀ = Q_a R_a,
    ΔW = Q_b (R_b R_aᵀ) Q_aᵀ, so only an (R, R) matrix is decomposed, R = Σ r_i."""
    a0, b0 = factors[0][0], factors[0][1]
    a_cat = torch.cat([w * s * a.float().flatten(1) for (a, _, s), w in zip(factors, weights, strict=True)])  # (R, d_in)
    b_cat = torch.cat([b.float().flatten(1) for _, b, _ in factors], dim=1)  # (d_out, R)
    qb, rb = torch.linalg.qr(b_cat)
    qa, ra = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    rank = min(rank, s.shape[0])
    b = ((qb @ u[:, :rank]) * s[:rank]).reshape(b0.shape[0], rank, *b0.shape[2:])
    return (vh[:rank] @ qa.T).reshape(rank, *a0.shape[1:]), b


def _inputs_for(inputs: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in inputs:
        raise CombineError(f"q='data-free' needs the inputs of every adapted module; none for {name!r} (have "
                           f"{', '.join(list(inputs)[:4])}...); collect them with collect_layer_inputs")
    return inputs[name].float().reshape(-1, inputs[name].shape[-1])


def _carried_tensors(values: list[Adapter]) -> dict[str, torch.Tensor]:
    """Tensors other than LoRA factors (modules_to_save): kept when every adapter holds the same values."""
    out = {}
    for key, t in values[0][2].items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if any(not torch.equal(v[2][key], t) for v in values[1:]):
            raise CombineError(f"the adapters hold different values of {key!r} (a module trained fully, "
                               "modules_to_save); a weighted mix of those is not defined; combine adapters that "
                               "share that module, or drop it from all but one")
        out[key] = t
    return out


def _result_config(config, ranks: dict[str, int]):
    """The combined adapter's LoRAConfig: scaling 1 (alpha = r) per module, plain init."""
    r = max(ranks.values())
    pattern = {name: k for name, k in ranks.items() if k != r}
    return dataclasses.replace(config, r=r, alpha=float(r), rslora=False, init="kaiming", rank_pattern=pattern,
                               alpha_pattern={name: float(k) for name, k in pattern.items()})


def tune_q(adapters: Sequence, weights: Sequence[float], score: Callable[[Adapter], float],
           qs: Sequence[float], how: str = "dare_linear", **options) -> tuple[float, Adapter, dict[float, float]]:
    """DAREx-q on a validation set: the q of `qs` whose combined adapter scores highest.

    Every q uses the same masks (same `seed`), so the grid compares rescales only. `score` takes the
    combined adapter `(config, meta, tensors)` and returns a number to maximise (e.g. validation accuracy).
    Returns (best q, its adapter, {q: score}).
    """
    if not how.startswith("dare"):
        raise CombineError(f"tune_q tunes DAREx-q's rescale, which applies to the dare modes, not {how!r}")
    values = [read_values(a) if isinstance(a, str | os.PathLike) else tuple(a) for a in adapters]
    scores: dict[float, float] = {}
    best: tuple[float, Adapter] | None = None
    for q in qs:
        adapter = combine(values, weights, how, q=float(q), **options)
        scores[float(q)] = float(score(adapter))
        if best is None or scores[float(q)] > scores[best[0]]:
            best = (float(q), adapter)
    if best is None:
        raise CombineError("tune_q needs at least one q in qs")
    return best[0], best[1], scores
