"""The rank-budget family's schedules: the mechanism of `rank_budget.py` with each method's pieces.

    method        importance (per)            budget                          allocation
    AdaLoRA       |w * g| EMA (triplet)       cubic decay init -> target      keep the b best triplets (mask lambda)

Each is registered for its config with `register_schedule`, so `peftkit.schedule_for(model, total)`
builds it and peftkit's training loop runs it without being asked.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.schedule import register_schedule
from ..methods.adalora import AdaLoRAConfig, check_budget_span
from .rank_budget import (
    RankBudgetSchedule,
    cubic_budget,
    keep_top,
    sensitivity,
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
        self._hooked: set[int] = set()

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
        elif id(optimizer) not in self._hooked:
            register(lambda *args: self.apply_masks())
            self._hooked.add(id(optimizer))

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
