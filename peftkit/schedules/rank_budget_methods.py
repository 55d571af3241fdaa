"""The rank-budget family's schedules: the mechanism of `rank_budget.py` with each method's pieces.

    method        importance (per)                budget                        allocation
    AdaLoRA       EMA of |w * g| (triplet)        cubic decay init -> target    keep the b best triplets (mask lambda)
    IncreLoRA     EMA of |dW * dL/d(dW)| (module) +rank_step every interval    grow the top_h modules
    TriAdaptLoRA  change of ||C||_F / n_blocks    +rank_step every interval    grow the modules over a threshold
                  (module, no EMA)                (more modules as u rises)    (the n-th best score)

Each is registered for its config with `register_schedule`, so `peftkit.schedule_for(model, total)`
builds it and peftkit's training loop runs it without being asked.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from ..core.config import ConfigError
from ..core.schedule import register_schedule
from ..methods.adalora import AdaLoRAConfig, check_budget_span
from ..methods.increlora import IncreLoRAConfig
from ..methods.triadaptlora import TriAdaptLoRAConfig
from .rank_budget import (
    RankBudgetSchedule,
    cubic_budget,
    growth_events_needed,
    keep_top,
    mean_over_ranks,
    modules_to_grow,
    sensitivity,
    top_modules,
    unit_norm,
)


class AdaLoRASchedule(RankBudgetSchedule):
    """Importance every step until T - tfinal, masks every delta_t steps, the final mask fixed after.

    Order within step t (as in the paper's Algorithm 1): score with the gradient of step t, let the
    optimizer step, then zero the masked lambda_i (an optimizer step post-hook). Between two mask
    updates the optimizer may move a masked lambda_i away from 0, so a triplet can come back; from
    T - tfinal on the mask is re-applied after every step, so masked lambda_i stay exactly 0.
    """

    def __init__(self, model: nn.Module, cfg: AdaLoRAConfig, total_steps: int | None) -> None:
        super().__init__(model, cfg, total_steps)
        check_budget_span(cfg.tinit, cfg.tfinal, self.total)
        self.initial = sum(layer.lora_E.shape[0] for layer in self.layers.values())
        self.target = min(cfg.target_r * len(self.layers), self.initial)
        self.final_step = self.total - cfg.tfinal
        self.pruned_elsewhere = bool(cfg.rank_pattern)  # read pruned from peft: only the regularizer runs
        self._pending = False
        self._hooked: weakref.WeakSet = weakref.WeakSet()  # optimizers that got the post-step hook

    def budget(self, step: int) -> int:
        """Total triplets kept at `step`."""
        c = self.cfg
        return cubic_budget(step, self.initial, self.target, c.tinit, c.tfinal, self.total)

    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        if self.pruned_elsewhere:
            return
        self.apply_masks()  # one an optimizer step never applied (a step GradScaler skipped)
        if step <= self.final_step:
            self._update_importance()
            if step == self.final_step or (step > self.cfg.tinit and step % self.cfg.delta_t == 0):
                self._allocate(self.budget(step))
                self._pending = True
            if step == self.final_step:
                self.ema.reset()  # the mask is final; peft drops its scores here too
        else:
            self._pending = True
        self._after_optimizer_step(optimizer)

    def _update_importance(self) -> None:
        for name, layer in self.layers.items():
            for local in ("lora_A", "lora_E", "lora_B"):
                self.ema.update(f"{name}.{local}", sensitivity(getattr(layer, local)))

    def triplet_scores(self, name: str) -> torch.Tensor:
        """S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji) for module `name`."""
        score = self.ema.score
        return (score(f"{name}.lora_E").reshape(-1) + score(f"{name}.lora_A").reshape(-1, self.layers[name].d_in)
                .mean(1) + score(f"{name}.lora_B").reshape(self.layers[name].d_out, -1).mean(0))

    def _allocate(self, budget: int) -> None:
        keeps = keep_top([self.triplet_scores(n) for n in self.layers], budget)
        for layer, keep in zip(self.layers.values(), keeps, strict=True):
            layer.rank_mask.copy_(keep)

    def _after_optimizer_step(self, optimizer) -> None:
        """Apply the masks after `optimizer.step()` (through its post-hook), or now without an optimizer."""
        register = getattr(optimizer, "register_step_post_hook", None)
        if register is None:
            self.apply_masks()
        elif optimizer not in self._hooked:
            register(lambda *args: self.apply_masks())
            self._hooked.add(optimizer)

    def apply_masks(self) -> None:
        """lambda_i = 0 for every masked triplet, if an allocation is waiting to be applied."""
        if self._pending:
            for layer in self.layers.values():
                layer.apply_rank_mask()
            self._pending = False

    def kept_ranks(self) -> dict[str, int]:
        """Triplets each module keeps now (peft's rank_pattern, summed)."""
        return {n: int(layer.rank_mask.sum()) for n, layer in self.layers.items()}


@register_schedule(AdaLoRAConfig)
def adalora_schedule(model: nn.Module, cfg: AdaLoRAConfig, total_steps: int | None) -> AdaLoRASchedule:
    return AdaLoRASchedule(model, cfg, total_steps)


class IncreLoRASchedule(RankBudgetSchedule):
    """Module scores in a window before each growth step; every incre_interval steps after init_warmup
    the top_h modules (among those below capacity) grow by rank_step, until target_rank x n_modules."""

    penalty = staticmethod(unit_norm)

    def __init__(self, model: nn.Module, cfg: IncreLoRAConfig, total_steps: int | None) -> None:
        super().__init__(model, cfg, total_steps)
        self.target = cfg.target_rank * len(self.layers)
        self.initial = sum(layer.active for layer in self.layers.values())
        events = growth_events_needed(self.initial, self.target, cfg.top_h, cfg.rank_step_value())
        last = self.growth_step_after(0) + (events - 1) * cfg.incre_interval
        if events and last > self.total:
            raise ConfigError(f"IncreLoRA needs {events} growth events, the last at step {last}, after training ends "
                              f"at step {self.total}; lower init_warmup or incre_interval, raise top_h, or train longer")
        self.counters = {"growth_events": 0}
        for layer in self.layers.values():  # until told otherwise (a resumed run starts mid-way)
            layer.capture_scores = self.total_rank() < self.target

    def total_rank(self) -> int:
        return sum(layer.active for layer in self.layers.values())

    def growth_step_after(self, step: int) -> int:
        """The first growth step after `step` (> init_warmup, a multiple of incre_interval)."""
        interval = self.cfg.incre_interval
        return (max(step, self.cfg.init_warmup) // interval + 1) * interval

    def in_window(self, step: int) -> bool:
        """Whether step's scores feed the EMA (all steps while growing, or the last score_window before a growth)."""
        window = self.cfg.score_window
        return window is None or self.growth_step_after(step - 1) - step < window

    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        if self.total_rank() >= self.target:
            return
        scores = mean_over_ranks(torch.stack([layer.take_score() for layer in self.layers.values()]))
        if self.in_window(step):
            for name, score in zip(self.layers, scores, strict=True):
                self.ema.update(name, score)
        if step > self.cfg.init_warmup and step % self.cfg.incre_interval == 0:
            self._grow()
        growing = self.total_rank() < self.target
        for layer in self.layers.values():
            layer.capture_scores = growing and self.in_window(step + 1)

    def _grow(self) -> None:
        remaining = self.target - self.total_rank()
        step_size = self.cfg.rank_step_value()
        names = [n for n, layer in self.layers.items() if layer.active < layer.capacity]
        count = min(self.cfg.top_h, len(names), -(-remaining // step_size))
        scores = torch.stack([self.ema.score(n).cpu() for n in names]) if names else torch.zeros(0)
        for i in top_modules(scores, count):
            layer = self.layers[names[i]]
            add = min(step_size, remaining, layer.capacity - layer.active)  # the last event is clipped
            layer.grow(add)
            remaining -= add
        self.counters["growth_events"] += 1
        if remaining == 0:
            for layer in self.layers.values():
                layer.stop_reserve()  # the code zeroes the last reserve's lambda: it leaves the forward

    def ranks(self) -> dict[str, int]:
        """Active rank of every module."""
        return {n: layer.active for n, layer in self.layers.items()}


@register_schedule(IncreLoRAConfig)
def increlora_schedule(model: nn.Module, cfg: IncreLoRAConfig, total_steps: int | None) -> IncreLoRASchedule:
    return IncreLoRASchedule(model, cfg, total_steps)


class TriAdaptLoRASchedule(RankBudgetSchedule):
    """Every incre_interval steps after init_warmup, the modules whose ||C||_F / n_blocks grew most since
    the previous growth event grow by rank_step; how many (the dynamic threshold) rises with progress."""

    def __init__(self, model: nn.Module, cfg: TriAdaptLoRAConfig, total_steps: int | None) -> None:
        super().__init__(model, cfg, total_steps)
        self.target = cfg.target_rank * len(self.layers)
        first = (cfg.init_warmup // cfg.incre_interval + 1) * cfg.incre_interval
        if first > self.total and self.total_rank() < self.target:
            raise ConfigError(f"TriAdaptLoRA's first growth step ({first}) comes after training ends at step "
                              f"{self.total}; lower init_warmup or incre_interval, or train longer")
        self.counters = {"growth_events": 0, **{f"norm/{n}": 0.0 for n in self.layers}}  # C starts at 0

    def total_rank(self) -> int:
        return sum(layer.active for layer in self.layers.values())

    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        growth_step = step > self.cfg.init_warmup and step % self.cfg.incre_interval == 0
        if growth_step and self.total_rank() < self.target:
            self._grow(step)

    def scores(self) -> dict[str, float]:
        """Change of each module's normalized Frobenius norm since the last call (which records the new norms)."""
        out = {}
        for name, layer in self.layers.items():
            norm = layer.core_norm().item()
            out[name], self.counters[f"norm/{name}"] = norm - self.counters[f"norm/{name}"], norm
        return out

    def _grow(self, step: int) -> None:
        scores, remaining, step_size = self.scores(), self.target - self.total_rank(), self.cfg.rank_step_value()
        names = [n for n, layer in self.layers.items() if layer.active < layer.capacity]
        progress = (step - self.cfg.init_warmup) / max(self.total - self.cfg.init_warmup, 1)
        needed = -(-remaining // step_size)  # more modules than this would add nothing
        count = min(modules_to_grow(remaining, progress, self.cfg.threshold, len(names)), needed)
        for i in top_modules(torch.tensor([scores[n] for n in names]), count):
            layer = self.layers[names[i]]
            add = min(step_size, remaining, layer.capacity - layer.active)  # the last event is clipped
            layer.grow(add)
            remaining -= add
        self.counters["growth_events"] += 1

    def ranks(self) -> dict[str, int]:
        """Current rank of every module."""
        return {n: layer.active for n, layer in self.layers.items()}


@register_schedule(TriAdaptLoRAConfig)
def triadaptlora_schedule(model: nn.Module, cfg: TriAdaptLoRAConfig, total_steps: int | None) -> TriAdaptLoRASchedule:
    return TriAdaptLoRASchedule(model, cfg, total_steps)
