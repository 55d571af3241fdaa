"""Optimizers: `torch.optim.Optimizer` subclasses (AdamR: AdamW decaying toward the initial values)."""

from .adamr import AdamR

__all__ = ["AdamR"]
