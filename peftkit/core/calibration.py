"""Calibration: the data-dependent step some methods take before `apply`.

A method whose adapter depends on the task (SPT: which weights are sensitive; LoFiT: which attention
heads matter) registers `calibrate(model, cfg, batches) -> cfg` (`registry.register_calibration`). It
reads a few batches and returns a finished config, which `apply`, `save` and `load` then treat like any
other: the result of the calibration (a plan, a list of heads) is part of the config, so a saved
adapter loads without data. Methods without a calibration get their config back unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .apply import has_adapter
from .config import AdapterConfig, ConfigError
from .registry import get_method


def calibrate(model: nn.Module, cfg: AdapterConfig, batches: Iterable) -> AdapterConfig:
    """The finished config of a method that needs task data before `apply`; `cfg` itself otherwise.

    `batches` yields model keyword dicts whose output has `.loss` (e.g. with `labels`), on the model's
    device; a method reads as many as its config says (SPT: `sensitivity_batches`), so an endless
    iterator is fine. The model is left as it was (weights, requires_grad flags, no adapter):

        cfg = peftkit.calibrate(model, SPTConfig(budget=20_000), batches)
        peftkit.apply(model, cfg)
    """
    method = get_method(cfg)
    if method.calibrate is None:
        return cfg
    if has_adapter(model):
        raise ConfigError(f"calibrate {cfg.method} on the base model, before peftkit.apply (or after unload)")
    return method.calibrate(model, cfg, batches)


def needs_calibration(cfg: AdapterConfig) -> bool:
    """True when `cfg`'s method registers a calibration (it may still return `cfg` unchanged)."""
    return get_method(cfg).calibrate is not None


def batch_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """`model(**batch).loss`: the loss of a calibration batch (batches carry labels)."""
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ConfigError("the model returned no .loss for a calibration batch; include labels in the batches "
                          "(or, for SPT, pass loss_fn=lambda model, batch: <scalar loss> to spt_plan)")
    return loss
