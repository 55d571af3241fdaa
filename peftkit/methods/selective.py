"""Selection methods: they add no modules and only choose which existing parameters train.

* full fine-tuning: every parameter trains (the upper reference every PEFT paper compares with);
* head-only: the body is frozen and only the output head trains (the linear-probe baseline);
* BitFit (Ben Zaken et al., 2021, arXiv:2106.10199): every bias term of the backbone, i.e.
  b in y = W x + b for each linear/conv layer and c in LayerNorm's w ⊙ x̂ + c;
* LayerNorm tuning (Zhao et al., 2023, arXiv:2312.11420): every normalisation layer's parameters
  (the weight w and bias c of w ⊙ x̂ + c; RMSNorm has only w).

Trainable count: all parameters; the head's; Σ bias sizes outside the head; Σ norm parameter sizes
outside the head. The trained tensors are the model's own: `disabled` swaps the originals back in, and
`unload` restores them unless the adapter was merged (head-only, BitFit, LN tuning; full fine-tuning
keeps no copy). BitFit and LN tuning leave the head to `modules_to_save` (a fresh classifier head
should be trained with them, as in both papers) and honour `layers`; `targets` does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from ..core.config import AdapterConfig, ConfigError
from ..core.inject import head_module_names, layer_index
from ..core.registry import register_selection
from ..core.weights import is_norm


@dataclass
class FullFineTuneConfig(AdapterConfig):
    """Train every parameter of the model (baseline)."""

    method = "full"
    trains_head = True
    paper: ClassVar[str] = "baseline"
    trainable: ClassVar[str] = "all parameters"
    keep_original: ClassVar[bool] = False  # a second copy of the whole model is too much to keep


@dataclass
class HeadOnlyConfig(AdapterConfig):
    """Train only the output head (`lm_head`, `classifier`, `score` ...); the body stays frozen."""

    method = "head-only"
    trains_head = True
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


class _SelectEverywhere(AdapterConfig):
    """Shared validation: the selection is by parameter role, so `targets` has no meaning."""

    def validate(self) -> None:
        if self.targets is not None:
            raise ConfigError(f"{self.method} trains every {self.selects} of the backbone and takes no targets "
                              f"(got {self.targets!r}); restrict it with layers=[...] or use another method")


@dataclass
class BitFitConfig(_SelectEverywhere):
    """BitFit: train only the bias terms of the backbone."""

    method = "bitfit"
    paper: ClassVar[str] = "Ben Zaken et al. 2021, arXiv:2106.10199"
    trainable: ClassVar[str] = "every bias of the backbone (d_out per linear/conv with a bias, d per LayerNorm)"
    selects: ClassVar[str] = "bias"


@dataclass
class LNTuningConfig(_SelectEverywhere):
    """LayerNorm tuning: train only the normalisation layers' parameters."""

    method = "ln-tuning"
    paper: ClassVar[str] = "Zhao et al. 2023, arXiv:2312.11420"
    trainable: ClassVar[str] = "every norm's weight and bias (2d per LayerNorm, d per RMSNorm)"
    selects: ClassVar[str] = "normalisation layer"


def _in_head(name: str, heads: set[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def _in_layers(name: str, layers: list[int] | None) -> bool:
    return layers is None or layer_index(name) in layers


def bias_parameter_names(model: nn.Module, layers: list[int] | None = None) -> list[str]:
    """Every parameter called `bias` outside the output head (inside blocks `layers` when given)."""
    heads = head_module_names(model)
    return [n for n, _ in model.named_parameters()
            if n.rsplit(".", 1)[-1] == "bias" and not _in_head(n, heads) and _in_layers(n, layers)]


def norm_parameter_names(model: nn.Module, layers: list[int] | None = None) -> list[str]:
    """Every parameter of a normalisation layer (`weights.is_norm`) outside the head (and inside `layers`)."""
    heads = head_module_names(model)
    return [f"{name}.{n}" for name, module in model.named_modules()
            if is_norm(module) and not _in_head(name, heads) and _in_layers(name, layers)
            for n, _ in module.named_parameters(recurse=False)]


def _where(cfg: AdapterConfig) -> str:
    return "" if cfg.layers is None else f" in blocks {cfg.layers}"


@register_selection(BitFitConfig)
def select_biases(model: nn.Module, cfg: BitFitConfig) -> list[str]:
    """All bias parameters of the backbone."""
    names = bias_parameter_names(model, cfg.layers)
    if not names:
        raise ConfigError(f"{type(model).__name__} has no bias parameters{_where(cfg)} (outside the head), so "
                          "BitFit has nothing to train; use ln-tuning (norm parameters) or ssf instead")
    return names


@register_selection(LNTuningConfig)
def select_norms(model: nn.Module, cfg: LNTuningConfig) -> list[str]:
    """All parameters of the backbone's normalisation layers."""
    names = norm_parameter_names(model, cfg.layers)
    if not names:
        raise ConfigError(f"{type(model).__name__} has no normalisation layer with parameters{_where(cfg)} "
                          "(LayerNorm, RMSNorm ...), so LN tuning has nothing to train; use bitfit or ssf instead")
    return names
