"""Selection baselines that add no modules and only choose which existing parameters train.

* full fine-tuning: every parameter trains (the upper reference every PEFT paper compares with);
* head-only: the body is frozen and only the output head trains (the linear-probe baseline).

Trainable count: all parameters, or the head's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from ..core.config import AdapterConfig, ConfigError
from ..core.inject import head_module_names
from ..core.registry import register_selection


@dataclass
class FullFineTuneConfig(AdapterConfig):
    """Train every parameter of the model (baseline)."""

    method = "full"
    paper: ClassVar[str] = "baseline"
    trainable: ClassVar[str] = "all parameters"
    keep_original: ClassVar[bool] = False  # a second copy of the whole model is too much to keep


@dataclass
class HeadOnlyConfig(AdapterConfig):
    """Train only the output head (`lm_head`, `classifier`, `score` ...); the body stays frozen."""

    method = "head-only"
    paper: ClassVar[str] = "baseline (linear probe)"
    trainable: ClassVar[str] = "the output head's parameters"


@register_selection(FullFineTuneConfig)
def select_all(model: nn.Module, cfg: FullFineTuneConfig) -> list[str]:
    """Every parameter name (shared tensors once)."""
    return [n for n, _ in model.named_parameters()]


@register_selection(HeadOnlyConfig)
def select_head(model: nn.Module, cfg: HeadOnlyConfig) -> list[str]:
    """Parameters of the output head modules (a tied head trains the shared embedding too)."""
    heads = head_module_names(model)
    # by identity, so a head tied to the input embeddings (GPT-2, SmolLM2) is found under its one name
    head_ids = {id(p) for n, m in model.named_modules() if n in heads for p in m.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in head_ids]
    if not names:
        raise ConfigError(
            f"found no output head in {type(model).__name__} (looked for get_output_embeddings() and modules "
            "named lm_head/classifier/score/head); use modules_to_save=[...] with another method instead"
        )
    return names
