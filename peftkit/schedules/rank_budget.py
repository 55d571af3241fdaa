"""Rank budgets: the one mechanism AdaLoRA, IncreLoRA and TriAdaptLoRA share, in three pluggable pieces.

    importance   sensitivity I (AdaLoRA: |w * dL/dw| per entry; IncreLoRA: sum |dW * dL/d(dW)| / sqrt(numel)
                 per module), smoothed by `ImportanceEMA` (TriAdaptLoRA: the change of a normalized Frobenius
                 norm between growth events, no EMA):
                 I_bar <- b1 I_bar + (1 - b1) I,  U_bar <- b2 U_bar + (1 - b2) |I - I_bar|,  score = I_bar * U_bar
    budget       how many ranks at step t: `cubic_budget` (AdaLoRA's decay), a growth event every interval
                 (IncreLoRA), a threshold that lets more modules grow as training goes on (`modules_to_grow`,
                 TriAdaptLoRA: linear, exponential or cosine in the training progress)
    allocation   which ranks: `keep_top` (mask all but the b best triplets) or grow the best modules

`RankBudgetSchedule` holds what is common (the layers, the EMA, the regularizer as `extra_loss`,
resumable state); each method's schedule is a small subclass registered with `register_schedule`,
so peftkit's loop runs it by itself and a plain loop calls `schedule.step(step, optimizer)` after
`loss.backward()` and before `optimizer.step()`.

The state a resumed run needs is split: ranks and masks live in the layers' buffers (saved with the
adapter, so `peftkit.load` rebuilds the same model), EMAs and counters in `state_dict()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..core.apply import get_state
from ..core.config import ConfigError
from ..core.schedule import MethodSchedule
from ..methods.svd_lora import SVDLayer


# --- importance ---------------------------------------------------------------------------------
class ImportanceEMA:
    """Sensitivity and uncertainty EMAs per key (a parameter or a module); score = I_bar * U_bar."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, key: str, importance: torch.Tensor) -> None:
        """Fold one step's importance in (the uncertainty uses the updated sensitivity, as in the paper)."""
        s = self.sensitivity.get(key, torch.zeros_like(importance))
        u = self.uncertainty.get(key, torch.zeros_like(importance))
        s = self.beta1 * s + (1 - self.beta1) * importance
        self.uncertainty[key] = self.beta2 * u + (1 - self.beta2) * (importance - s).abs()
        self.sensitivity[key] = s

    def score(self, key: str) -> torch.Tensor:
        """I_bar * U_bar (0 for a key never updated)."""
        if key not in self.sensitivity:
            return torch.zeros(())
        return self.sensitivity[key] * self.uncertainty[key]

    def reset(self) -> None:
        self.sensitivity.clear()
        self.uncertainty.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{kind}/{k}": v for kind, d in (("s", self.sensitivity), ("u", self.uncertainty)) for k, v in d.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
        self.reset()
        for key, value in state.items():
            kind, name = key.split("/", 1)
            (self.sensitivity if kind == "s" else self.uncertainty)[name] = value.to(device)


def sensitivity(param: torch.Tensor) -> torch.Tensor:
    """|w * dL/dw| per entry (zeros when the parameter has no gradient this step)."""
    if param.grad is None:
        return torch.zeros_like(param, dtype=torch.float32)
    return (param.detach() * param.grad).abs().float()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a score tensor over processes, so that every rank takes the same allocation decision."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


# --- budgets ------------------------------------------------------------------------------------
def cubic_budget(step: int, initial: int, target: int, tinit: int, tfinal: int, total: int) -> int:
    """AdaLoRA's budget b(t): `initial` until tinit, then a cubic decay reaching `target` at total - tfinal.

    b(t) = target + (initial - target) (1 - (t - tinit) / (total - tfinal - tinit))^3, rounded down as in peft.
    """
    if step <= tinit:
        return initial
    if step >= total - tfinal:
        return target
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    return int(target + (initial - target) * remaining**3)


GROWTH_SHAPES: dict[str, Callable[[int, float], float]] = {
    "linear": lambda remaining, u: remaining * u,
    "exponential": lambda remaining, u: remaining**u,  # exp(u ln remaining): the found code's "non-linear"
    "cosine": lambda remaining, u: remaining * (1 - math.cos(math.pi * u)) / 2,
}
"""TriAdaptLoRA's dynamic threshold: how many modules grow at training progress u in [0, 1], given the
rank still missing; the threshold is then the score of the last module chosen."""


def modules_to_grow(remaining: int, progress: float, shape: str, eligible: int) -> int:
    """The number of modules that grow now: GROWTH_SHAPES[shape], at least 1, at most `eligible`."""
    count = int(GROWTH_SHAPES[shape](remaining, min(max(progress, 0.0), 1.0)) + 1e-9)  # cos(pi/2) is not 0
    return min(max(count, 1), eligible)


def growth_events_needed(initial: int, target: int, modules_per_event: int, rank_step: int) -> int:
    """IncreLoRA's number of growth events: ceil((target - initial) / (top_h * rank_step))."""
    return math.ceil(max(target - initial, 0) / (modules_per_event * rank_step))


# --- allocation ---------------------------------------------------------------------------------
def keep_top(scores: Sequence[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Keep masks that keep exactly the `budget` best scores over all modules.

    Ties are broken by position (the earlier triplet stays), so the kept total equals the budget;
    peft's `score <= kth value` masks every tied triplet and can keep fewer.
    """
    flat = torch.cat([s.reshape(-1).float().cpu() for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, descending=True, stable=True)[: max(budget, 0)]] = True
    return list(keep.split([s.numel() for s in scores]))


def top_modules(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` best modules, best first (ties: the earlier module)."""
    return torch.argsort(scores.float().cpu(), descending=True, stable=True)[:count].tolist()


# --- regularizers (the `extra_loss` of a schedule) ----------------------------------------------
def orthogonality(layers: Sequence[SVDLayer]) -> torch.Tensor:
    """AdaLoRA's R = mean over every P and every Q of ||P^T P - I||_F and ||Q Q^T - I||_F."""
    terms = []
    for layer in layers:
        q, _, p = layer.factors()
        for gram in (p.T @ p, q @ q.T):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye).float())
    return torch.stack(terms).mean()


def unit_norm(layers: Sequence[SVDLayer]) -> torch.Tensor:
    """IncreLoRA's regularizer: its code stores each triplet's q_i, p_i as separate rank-1 tensors, so
    ||q q^T - I|| is |‖q_i‖^2 - 1|; mean over every q_i and p_i in the forward (no cross-orthogonality)."""
    terms = []
    for layer in layers:
        q, _, p = layer.factors()
        terms += [(q.float().pow(2).sum(1) - 1).abs(), (p.float().pow(2).sum(0) - 1).abs()]
    return torch.cat(terms).mean()


# --- the shared schedule ------------------------------------------------------------------------
class RankBudgetSchedule(MethodSchedule):
    """What the family's schedules share: layers by name, an ImportanceEMA, the regularizer, state.

    Subclasses set `penalty` and write `on_after_backward`; extra state goes in `counters`
    (JSON-able numbers), which `state_dict` saves next to the EMA tensors. Methods without an EMA
    (TriAdaptLoRA) have no beta1/beta2 in their config.
    """

    penalty: Callable[[Sequence[SVDLayer]], torch.Tensor] = staticmethod(orthogonality)

    def __init__(self, model: nn.Module, cfg, total_steps: int | None) -> None:
        super().__init__(model)
        self.cfg = cfg
        self.layers: dict[str, SVDLayer] = dict(get_state(model).layers)
        self.total = resolve_total(cfg, total_steps)
        self.ema = ImportanceEMA(cfg.beta1, cfg.beta2) if hasattr(cfg, "beta1") else None
        self.counters: dict[str, int | float | bool] = {}

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if not self.cfg.orth_reg_weight:
            return None
        return self.cfg.orth_reg_weight * type(self).penalty(list(self.layers.values()))

    def state_dict(self) -> dict:
        ema = {} if self.ema is None else {f"ema/{k}": v for k, v in self.ema.state_dict().items()}
        return {**ema, **self.counters}

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None:
            device = next(iter(self.layers.values())).ranknum.device
            self.ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema/")}, device)
        self.counters.update({k: v for k, v in state.items() if not k.startswith("ema/")})


def resolve_total(cfg, total_steps: int | None) -> int:
    """The schedule's length: the config's total_steps, else the run's; refuses one longer than the run."""
    own = getattr(cfg, "total_steps", None)
    if own is None and total_steps is None:
        raise ConfigError(f"the {cfg.method} schedule needs the number of training steps: pass "
                          f"schedule_for(model, total_steps=...) or set total_steps in its config")
    if own is not None and total_steps is not None and own > total_steps:
        raise ConfigError(f"the {cfg.method} schedule spans total_steps={own}, but training ends after "
                          f"{total_steps} steps; lower total_steps or train longer")
    return own if own is not None else total_steps
