"""What `combine` refuses before touching a tensor: mixed methods, targets, modules or bases, bad options."""

from __future__ import annotations

import torch

from ..core.config import ConfigError

NOT_ADDITIVE = {
    "ia3": "(IA)³ vectors rescale activations multiplicatively, so a weighted sum of them is not the sum of "
           "their effects",
    "dora": "DoRA divides by the column norm of W0 + B A, so its update is not additive in B A",
}
"""Methods whose refusal needs a reason beyond "not LoRA's A/B form"."""


class CombineError(ConfigError):
    """Adapters that cannot be combined, or options that do not fit the mode (a user error)."""


def check_call(values: list[tuple], weights, how: str, modes: tuple[str, ...], options: dict,
               allow_different_base: bool) -> None:
    """Raise a CombineError naming what is wrong with a `combine` call, and what to do."""
    if how not in modes:
        raise CombineError(f"unknown combination {how!r}; choose one of {', '.join(modes)}")
    if not values or len(weights) != len(values):
        raise CombineError(f"give one weight per adapter: {len(values)} adapter(s), {len(weights)} weight(s)")
    for i, (cfg, _, _) in enumerate(values):
        _check_method(i, cfg)
    _check_same(values, how, allow_different_base)
    _check_options(how, **options)


def _check_method(i: int, cfg) -> None:
    if cfg.method != "lora":
        why = NOT_ADDITIVE.get(cfg.method, f"{cfg.method} does not have LoRA's A/B form")
        raise CombineError(f"adapter {i} is a {cfg.method} adapter: {why}; combine supports LoRA adapters only")
    if getattr(cfg, "init", "kaiming") in ("pissa", "olora"):
        raise CombineError(f"adapter {i} uses init={cfg.init!r}, whose base holds a residual W0 - s B0 A0; export "
                           "it as a plain LoRA first (peftkit export --format peft, then load and save it)")


def _check_same(values: list[tuple], how: str, allow_different_base: bool) -> None:
    first_cfg, first_meta, first = values[0]
    for i, (cfg, meta, tensors) in enumerate(values[1:], start=1):
        differ = [f for f in ("targets", "exclude", "layers", "modules_to_save")
                  if getattr(cfg, f) != getattr(first_cfg, f)]
        if differ:
            raise CombineError(f"adapter {i} differs from adapter 0 in {', '.join(differ)} ("
                               + "; ".join(f"{getattr(first_cfg, f)!r} vs {getattr(cfg, f)!r}" for f in differ)
                               + "); combine adapters of the same targets")
        if set(tensors) != set(first):
            extra, missing = sorted(set(tensors) - set(first)), sorted(set(first) - set(tensors))
            raise CombineError(f"adapter {i} adapts other modules than adapter 0 (only in {i}: {extra[:3]}, only in "
                               f"0: {missing[:3]}); combine adapters of the same modules")
        if not allow_different_base and (meta.get("base_fingerprint") or {}) != (first_meta.get("base_fingerprint")
                                                                                 or {}):
            raise CombineError(f"adapter {i} was trained on a different base model than adapter 0 (their base "
                               "fingerprints differ); pass allow_different_base=True (--allow-different-base) to "
                               "combine them anyway")
        _check_shapes(i, first, tensors, how)


def _check_shapes(i: int, first: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], how: str) -> None:
    for key, t in tensors.items():
        ref = first[key]
        if t.shape == ref.shape:
            continue
        dim = {"lora_A": 0, "lora_B": 1}.get(key.rsplit(".", 1)[-1])
        if dim is None or _without(t.shape, dim) != _without(ref.shape, dim):
            raise CombineError(f"{key} has shape {tuple(t.shape)} in adapter {i} and {tuple(ref.shape)} in adapter 0")
        if how != "cat" and not how.endswith("svd"):  # only the rank differs: fine outside factor space
            raise CombineError(f"{how!r} needs one rank for all adapters, but {key} has rank {t.shape[dim]} in "
                               f"adapter {i} and {ref.shape[dim]} in adapter 0; use 'cat' or 'svd'")


def _without(shape: torch.Size, dim: int) -> tuple[int, ...]:
    return tuple(shape[:dim]) + tuple(shape[dim + 1:])


def _check_options(how: str, density: float, majority_sign_method: str, q, inputs, svd_rank) -> None:
    low = 0.0 if how.startswith("dare") else -1e-12
    if not (isinstance(density, int | float) and low < density <= 1.0):
        raise CombineError(f"density must be in {'(0' if low == 0 else '[0'}, 1] (the kept fraction), got {density!r}")
    if density < 1.0 and not how.startswith(("ties", "dare", "magnitude_prune")):
        raise CombineError(f"density applies to ties, dare and magnitude_prune modes, not {how!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise CombineError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if q is not None and not how.startswith("dare"):
        raise CombineError(f"q (DAREx-q) applies to the dare modes, not {how!r}")
    if q == "data-free" and not inputs:
        raise CombineError("q='data-free' needs inputs={module name: X (n, d_in)}; collect them with "
                           "peftkit.train.layer_inputs.collect_layer_inputs(model, batches)")
    if q is not None and q != "data-free" and not (isinstance(q, int | float) and q > 0):
        raise CombineError(f"q must be a positive number (the rescale is 1/q) or 'data-free', got {q!r}")
    if svd_rank is not None and not (isinstance(svd_rank, int) and svd_rank >= 1 and how.endswith("svd")):
        raise CombineError(f"svd_rank must be a positive integer and applies to the svd modes, got {svd_rank!r} "
                           f"with {how!r}")
