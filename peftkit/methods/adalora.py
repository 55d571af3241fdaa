"""AdaLoRA: adaptive budget allocation in SVD form (Zhang et al., 2023, arXiv:2303.10512).

    y = W0 x + b0 + alpha / (init_r + 1e-5) * P diag(lambda) Q dropout(x)     (see svd_lora.py)

Every module starts with `init_r` triplets; a cubic budget schedule masks the least important ones
(lambda_i = 0) until `target_r x n_modules` remain, scored by sensitivity x uncertainty of
|w * dL/dw| (`peftkit/schedules/rank_budget.py`, run by peftkit's loop, or `schedule.step(...)` in a
plain loop). The loss gains gamma R, R = mean over P's and Q's of ||P^T P - I||_F, ||Q Q^T - I||_F.

Trainable parameters per layer: init_r (d_in + d_out) + init_r (pruned triplets keep their slots,
so the optimizer's parameter list never changes). Defaults follow peft 0.21 (init_r 12, target_r 8,
alpha 8, beta 0.85, orth_reg_weight 0.5, delta_t 1); the paper uses gamma 0.1 and delta_t ~100.

Which triplets are kept lives in each layer's `rank_mask` buffer (saved with the adapter, so
`peftkit.load` and resuming rebuild the same model). A Hugging Face peft export drops the masked
triplets and writes peft's `rank_pattern`; a peft file with a `rank_pattern` is read into layers of
the kept size (`AdaLoRAConfig.rank_pattern`), with the scale of `init_r`, exactly as peft does
(methods/peft/adalora.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.registry import register
from .svd_lora import SVDLayer, init_factors


@dataclass
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA: SVD-form low-rank updates whose ranks a budget schedule prunes during training."""

    method = "adalora"
    paper: ClassVar[str] = "Zhang et al. 2023, arXiv:2303.10512"
    trainable: ClassVar[str] = "init_r (d_in + d_out) + init_r per layer"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); every linear layer but the head by default."""

    init_r: int = 12
    """Triplets per module at the start (the budget starts at init_r x n_modules)."""

    target_r: int = 8
    """Average triplets per module at the end: the budget ends at target_r x n_modules."""

    alpha: float = 8.0
    """Scale numerator: the update is multiplied by alpha / init_r (peft's lora_alpha / ranknum)."""

    dropout: float = 0.0
    """Dropout probability on the input of the low-rank path."""

    tinit: int = 0
    """Steps of warm-up before any triplet is masked (budget stays at init_r x n_modules)."""

    tfinal: int = 0
    """Steps at the end with the final mask fixed (budget target_r x n_modules)."""

    delta_t: int = 1
    """Steps between two mask updates while the budget shrinks (peft's deltaT)."""

    beta1: float = 0.85
    """EMA factor of the sensitivity |w * grad|."""

    beta2: float = 0.85
    """EMA factor of the uncertainty |sensitivity - its EMA|."""

    orth_reg_weight: float = 0.5
    """gamma: weight of the orthogonality regularizer added to the loss (0 switches it off)."""

    total_steps: int | None = None
    """Steps the budget schedule spans; None: the training run's length (peftkit's loop passes it,
    a plain loop passes `schedule_for(model, total_steps=...)`)."""

    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)
    """{module name: init_r flags} of an adapter pruned elsewhere (read from peft's rank_pattern):
    those modules hold only the flagged triplets. Training keeps masks in the layers instead."""

    def validate(self) -> None:
        if not isinstance(self.init_r, int) or not isinstance(self.target_r, int) or not 1 <= self.target_r <= self.init_r:
            raise ConfigError(f"AdaLoRA needs integers 1 <= target_r <= init_r, got target_r={self.target_r}, "
                              f"init_r={self.init_r}; the budget only shrinks")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tinit < 0 or self.tfinal < 0 or self.delta_t < 1:
            raise ConfigError(f"need tinit >= 0, tfinal >= 0, delta_t >= 1; got {self.tinit}, {self.tfinal}, {self.delta_t}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.total_steps is not None:
            check_budget_span(self.tinit, self.tfinal, self.total_steps)
        bad = {n: len(v) for n, v in self.rank_pattern.items() if len(v) != self.init_r}
        if bad:
            raise ConfigError(f"rank_pattern entries need init_r={self.init_r} flags each; got lengths {bad}")


def check_budget_span(tinit: int, tfinal: int, total_steps: int) -> None:
    """The budget must have steps to shrink in: tinit + tfinal < total_steps."""
    if tinit + tfinal >= total_steps:
        raise ConfigError(f"the AdaLoRA budget schedule has no steps to prune in: tinit ({tinit}) + tfinal ({tfinal}) "
                          f">= total steps ({total_steps}); lower tinit/tfinal or train longer")


class AdaLoRALinear(SVDLayer):
    """AdaLoRA on nn.Linear and GPT-2 Conv1D: P, lambda, Q as single tensors plus a keep mask."""

    def __init__(self, base: nn.Module, init_r: int, alpha: float, dropout: float,
                 held: list[bool] | None = None) -> None:
        super().__init__(base, alpha, dropout, ranknum=init_r)
        self.held = list(held) if held is not None else [True] * init_r
        """Which of the init_r triplets this layer holds (all, unless read from a pruned peft file)."""
        r = sum(self.held)
        self.lora_A = nn.Parameter(torch.zeros(r, self.d_in, **self.factory))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **self.factory))
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, r, **self.factory))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=self.lora_A.device))

    def reset_parameters(self) -> None:
        init_factors(self.lora_A, self.lora_B, self.lora_E)
        self.rank_mask.fill_(True)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_E, self.lora_B

    @torch.no_grad()
    def apply_rank_mask(self) -> None:
        """lambda_i = 0 for every masked triplet (the schedule calls it after each optimizer step)."""
        self.lora_E.masked_fill_(~self.rank_mask[:, None], 0.0)

    def kept(self) -> torch.Tensor:
        """Triplets that contribute: kept by the mask, or revived by the optimizer since the last mask."""
        return self.rank_mask | (self.lora_E[:, 0] != 0)


@register(AdaLoRAConfig)
def build(module: nn.Module, cfg: AdaLoRAConfig, name: str) -> AdaLoRALinear | None:
    """Wrap a linear layer (None for other kinds); refuses init_r larger than the layer."""
    if not weights.is_linear(module):
        return None
    d_in, d_out = weights.in_out_features(module)
    if cfg.init_r > min(d_in, d_out):
        raise ConfigError(f"AdaLoRA init_r={cfg.init_r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {name}; "
                          "lower init_r or exclude that module")
    return AdaLoRALinear(module, cfg.init_r, cfg.alpha, cfg.dropout, cfg.rank_pattern.get(name))
