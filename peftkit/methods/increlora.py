"""IncreLoRA: incremental parameter allocation (Zhang et al., 2023, arXiv:2308.12043).

    y = W0 x + b0 + alpha / (ranknum + 1e-5) * P diag(lambda) Q dropout(x)     (see svd_lora.py)

Every module starts at rank `init_r` (1 in the paper's scripts); every `incre_interval` steps after
`init_warmup` the `top_h` modules with the highest score I_bar * U_bar of
sum |dW * dL/d(dW)| / sqrt(d_out d_in) grow by `rank_step` triplets, until the total rank is
`target_rank x n_modules` (`peftkit/schedules/rank_budget_methods.py`). `ranknum` is the current rank,
so a module's scale alpha / ranknum shrinks as it grows (as in the authors' code).

"Advance learning" (paper Sec. 3.3, code `add_reserve_param`): each module also trains `rank_step`
reserve triplets whose lambda is the constant 1e-5; growing makes their lambda trainable (from 1e-5)
and the next triplets become the reserve. So the model is the identity at init only up to an offset
of order 1e-5 * |P Q| (exactly with `advance_learning=False`, where new triplets start at lambda = 0).

Growth without new Parameters (our choice): each module preallocates `max_r` triplets in chunks
(init_r, then rank_step each; `lora_A.0`, `lora_A.1`, ...). A chunk outside the forward has no
gradient (grad None), so optimizers skip it entirely: no update, no weight decay, no state; its Adam
state starts at its first gradient, as the paper's new optimizer param group would. The parameter
list never changes, so all-reduce, clipping, checkpoints and resume work unchanged. Memory: the
preallocated slots cost max_r (d_in + d_out + 1) floats per module (default max_r = 4 target_rank,
at most min(d_in, d_out)); optimizer state grows only with the ranks in use.

Trainable parameters (allocated) per layer: max_r (d_in + d_out + 1). Deviations from the code: the
last growth event is clipped so the total equals the target exactly (the code can overshoot), the
top_h modules are chosen by rank (ties: earlier module) rather than `score >= h-th score`, and module
scores by default feed the EMA only in the `score_window` steps before each growth event (they are
only read there; with beta 0.85 the state older than 50 steps weighs 0.85^50 < 1e-3). No Hugging Face
peft equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.registry import register
from .svd_lora import RankGrowth, SVDLayer, init_factors

RESERVE_LAMBDA = 1e-5
"""The constant lambda of reserve triplets (advance learning)."""


@dataclass
class IncreLoRAConfig(RankGrowth, AdapterConfig):
    """IncreLoRA: SVD-form updates that start at rank 1 and grow where the scores are highest."""

    method = "increlora"
    paper: ClassVar[str] = "Zhang et al. 2023, arXiv:2308.12043"
    trainable: ClassVar[str] = "max_r (d_in + d_out + 1) per layer (allocated; ranks in use train)"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); every linear layer but the head by default."""

    init_r: int = 1
    """Rank of every module at the start (the code's lora_r)."""

    target_rank: int = 8
    """Average rank at the end: growth stops at target_rank x n_modules."""

    rank_step: int | None = None
    """Triplets a chosen module gains per growth event; None: target_rank // 2 (the code's {2:1, 4:2, 6:3, 8:4})."""

    max_r: int | None = None
    """Triplets a module can hold (preallocated); None: 4 x target_rank, at most min(d_in, d_out)."""

    top_h: int = 2
    """Modules chosen per growth event."""

    init_warmup: int = 100
    """Steps before the first growth event (the scripts use 100 for CoLA, 1000 for MNLI)."""

    incre_interval: int = 100
    """Steps between growth events."""

    advance_learning: bool = True
    """Train reserve triplets (lambda fixed at 1e-5) before they are added."""

    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / current rank."""

    dropout: float = 0.0
    """Dropout probability on the input of the low-rank path."""

    beta1: float = 0.85
    """EMA factor of the module sensitivity."""

    beta2: float = 0.85
    """EMA factor of the module uncertainty."""

    orth_reg_weight: float = 0.1
    """Weight of the unit-norm regularizer on every q_i and p_i (the code's reg_orth_coef)."""

    score_window: int | None = 50
    """Steps before each growth event whose module scores feed the EMA (None: every step while
    growing). Computing a score costs a weight-sized product dL/d(dW) per module."""

    total_steps: int | None = None
    """Steps of training the growth must fit in; None: the training run's length."""

    def validate(self) -> None:
        ints = {k: getattr(self, k) for k in ("init_r", "target_rank", "top_h", "init_warmup", "incre_interval")}
        if any(not isinstance(v, int) for v in ints.values()) or min(ints.values()) < 0 or self.init_r < 1:
            raise ConfigError(f"IncreLoRA needs integers init_r >= 1 and non-negative {', '.join(ints)}; got {ints}")
        if self.target_rank < self.init_r or self.top_h < 1 or self.incre_interval < 1 or self.rank_step_value() < 1:
            raise ConfigError(f"need target_rank >= init_r, top_h >= 1, incre_interval >= 1, rank_step >= 1; got "
                              f"{self.target_rank}, {self.init_r}, {self.top_h}, {self.incre_interval}, {self.rank_step}")
        if self.max_r is not None and self.max_r < max(self.init_r, self.target_rank):
            raise ConfigError(f"max_r={self.max_r} is below init_r/target_rank; a module must be able to hold them")
        if self.alpha <= 0 or not 0.0 <= self.dropout < 1.0 or self.orth_reg_weight < 0:
            raise ConfigError(f"need alpha > 0, 0 <= dropout < 1, orth_reg_weight >= 0; got {self.alpha}, "
                              f"{self.dropout}, {self.orth_reg_weight}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.score_window is not None and self.score_window < 1:
            raise ConfigError(f"score_window must be None or >= 1, got {self.score_window}")


def chunk_sizes(init_r: int, rank_step: int, capacity: int) -> list[int]:
    """The Parameter chunks of a module: init_r, then rank_step each (the last one may be smaller)."""
    sizes = [init_r]
    while sum(sizes) < capacity:
        sizes.append(min(rank_step, capacity - sum(sizes)))
    return sizes


class GrowingSVDLinear(SVDLayer):
    """An SVD-form layer whose rank grows: the first `active` triplets train, then `rank_step` reserves.

    Shared by IncreLoRA and TriAdaptLoRA. `ranknum` (the active rank) and `reserve_on` are buffers, so a
    saved adapter or checkpoint rebuilds the same forward.
    """

    def __init__(self, base: nn.Module, init_r: int, rank_step: int, capacity: int, alpha: float,
                 dropout: float, advance_learning: bool) -> None:
        super().__init__(base, alpha, dropout, ranknum=init_r)
        sizes = chunk_sizes(init_r, rank_step, capacity)
        kw = self.factory
        self.lora_A = nn.ParameterList([nn.Parameter(torch.zeros(k, self.d_in, **kw)) for k in sizes])
        self.lora_E = nn.ParameterList([nn.Parameter(torch.zeros(k, 1, **kw)) for k in sizes])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(self.d_out, k, **kw)) for k in sizes])
        self.register_buffer("reserve_on", torch.tensor(advance_learning, device=kw["device"]))
        self.init_r, self.rank_step, self.capacity = init_r, rank_step, capacity
        self.advance_learning = advance_learning
        self.active, self.reserving = init_r, advance_learning  # Python mirrors of the buffers (no device sync)

    def reset_parameters(self) -> None:
        later = RESERVE_LAMBDA if self.advance_learning else 0.0  # a reserve's lambda, kept until it is added
        for i, (a, e, b) in enumerate(zip(self.lora_A, self.lora_E, self.lora_B, strict=True)):
            init_factors(a, b, e, 0.0 if i == 0 else later)
        self.ranknum.fill_(self.init_r)
        self.reserve_on.fill_(self.advance_learning)
        self.after_load()

    def after_load(self) -> None:
        self.active, self.reserving = int(round(self.ranknum.item())), bool(self.reserve_on.item())

    def reserve(self) -> int:
        """Reserve triplets in the forward now."""
        return min(self.rank_step, self.capacity - self.active) if self.reserving else 0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        used, offset = self.active + self.reserve(), 0
        qs, lams, ps = [], [], []
        for a, e, b in zip(self.lora_A, self.lora_E, self.lora_B, strict=True):
            if offset >= used:
                break  # chunks after this one stay out of the graph: no gradient, untouched by the optimizer
            take = min(a.shape[0], used - offset)
            live = max(0, min(take, self.active - offset))
            qs.append(a[:take])
            ps.append(b[:, :take])
            if live:
                lams.append(e[:live])
            if take > live:  # reserves: constant lambda, no gradient
                lams.append(torch.full((take - live, 1), RESERVE_LAMBDA, dtype=e.dtype, device=e.device))
            offset += a.shape[0]
        return torch.cat(qs), torch.cat(lams), torch.cat(ps, dim=1)

    @torch.no_grad()
    def grow(self, count: int) -> None:
        """Add `count` triplets: the reserve's (or the next ones') lambda starts to train."""
        self.active = min(self.active + count, self.capacity)
        self.ranknum.fill_(self.active)

    @torch.no_grad()
    def stop_reserve(self) -> None:
        """Growth is over: reserve triplets leave the forward."""
        self.reserving = False
        self.reserve_on.fill_(False)


@register(IncreLoRAConfig)
def build(module: nn.Module, cfg: IncreLoRAConfig, name: str) -> GrowingSVDLinear | None:
    """Wrap a linear layer (None for other kinds); refuses ranks larger than the layer."""
    if not weights.is_linear(module):
        return None
    d_in, d_out = weights.in_out_features(module)
    capacity = cfg.max_r_for(d_in, d_out)
    if max(capacity, cfg.target_rank) > min(d_in, d_out):
        raise ConfigError(f"IncreLoRA max_r/target_rank ({capacity}/{cfg.target_rank}) exceed min(d_in, d_out) = "
                          f"{min(d_in, d_out)} of {name}; lower them or exclude that module")
    return GrowingSVDLinear(module, cfg.init_r, cfg.rank_step_value(), capacity, cfg.alpha, cfg.dropout,
                            cfg.advance_learning)
