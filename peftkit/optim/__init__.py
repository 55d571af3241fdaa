"""Optimizers: `torch.optim.Optimizer` subclasses (AdamR: AdamW decaying toward the initial values)."""

from .adamr import AdamR
from .galore import GaLoreAdamW, galore_param_groups
from .mezo import MeZO

__all__ = ["AdamR", "GaLoreAdamW", "galore_param_groups", "MeZO"]
