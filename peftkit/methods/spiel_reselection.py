"""SpIEL's re-selection of trainable entries (methods.md 5.1; the layer and the paper are in spiel.py).

Every `reselection_steps` = R optimizer steps, after a window of `selection_accumulation_steps` = A steps
(steps A, R + A, 2R + A, ... end the windows):

1. the window's first backward picks, per layer, the k positions of largest |dL/dW| as candidates, and
   every window step adds its gradient g (micro-batches summed) at them to Σg and g² to Σg²;
2. after the optimizer step ending the window: drop the n = floor(k p) smallest-|value| entries, grow the
   top-n candidates by |Σg| that are not among the kept entries, remove drop ∩ grow collisions from both,
   so exactly n - collisions entries change (fewer only if fewer candidates are free);
3. regrown values are 0; their Adam moments are seeded (`seed_moments`); η is re-sorted, and the values,
   their gradient and every per-entry optimizer tensor are permuted with it, in place (the optimizer keeps
   the same tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

from ..core.config import ConfigError
from ..core.layer import adapter_layers
from ..core.schedule import MethodSchedule, register_schedule
from .spiel import DECAYS, SpIELConfig, SpIELLinear


@dataclass
class WindowStats:
    """One layer's gradient statistics at its k candidate positions during a selection window."""

    index: torch.Tensor
    """(k,) flat positions: the top-k |dL/dW| of the window's first backward."""
    step_sum: torch.Tensor
    """Sum of the current step's micro-batch gradients at the candidates."""
    grad_sum: torch.Tensor
    """Σg over the window's finished steps."""
    grad_sq_sum: torch.Tensor
    """Σg² over the window's finished steps."""
    steps: int = 0
    """n_s: finished steps in the window."""


def plan_regrowth(index: torch.Tensor, values: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots of η to refill, positions into `candidates` refilling them), of equal length.

    Drops the n smallest |values| (smallest first); grows the n best-scored candidates not among the kept
    entries; a position both dropped and grown is removed from both lists (it stays, with its value).
    """
    empty = torch.empty(0, dtype=torch.long, device=index.device)
    n = min(n, index.numel())
    if n <= 0:
        return empty, empty
    drop = torch.topk(values.detach().abs(), n, largest=False, sorted=True).indices
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[drop] = False
    free = (~torch.isin(candidates, index[keep])).nonzero().squeeze(1)
    grow = free[torch.topk(scores[free], min(n, free.numel()), sorted=True).indices]
    outgoing, incoming = index[drop], candidates[grow]
    drop = drop[~torch.isin(outgoing, incoming)]
    grow = grow[~torch.isin(incoming, outgoing)]
    return drop[: grow.numel()], grow


def seed_moments(state: dict, betas: tuple[float, float], slots: torch.Tensor, mean_grad: torch.Tensor,
                 mean_sq: torch.Tensor, numel: int) -> None:
    """Seed regrown entries' rows of an Adam state in place, with bias counter-correction.

    torch's Adam divides exp_avg by 1 - β1^(t+1) at its next step (t = state["step"]); seeding
    m = ḡ (1 - β1^t) (and v = mean g² (1 - β2^t)) makes that step start from the window means.
    Other per-entry tensors (SGD momentum, ...) get zeros in those rows.
    """
    t = float(state["step"]) if "step" in state else 0.0
    beta1, beta2 = (float(b) for b in betas)
    seeds = {"exp_avg": mean_grad * (1 - beta1**t), "exp_avg_sq": mean_sq * (1 - beta2**t),
             "max_exp_avg_sq": mean_sq * (1 - beta2**t)}
    for key, tensor in per_entry_state(state, numel).items():
        seed = seeds.get(key)
        tensor[slots] = 0 if seed is None else seed.to(tensor.dtype)


def per_entry_state(state: dict, numel: int) -> dict[str, torch.Tensor]:
    """The optimizer-state tensors holding one row per entry of a `numel`-entry values vector (not the step)."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == numel}


class SpIELSchedule(MethodSchedule):
    """Selection windows, drop/grow re-selection and optimizer-state surgery for every SpIEL layer.

    `replaced` records, per layer, how many entries the last re-selection changed.
    """

    def __init__(self, model: nn.Module, cfg: SpIELConfig, total_steps: int | None) -> None:
        super().__init__(model)
        if not total_steps or total_steps < 1:
            raise ConfigError("SpIEL's replacement rate decays to 0 at the last step; create its schedule with "
                              "peftkit.schedule_for(model, total_steps=<optimizer steps>)")
        self.cfg, self.total_steps = cfg, total_steps
        self.layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, SpIELLinear)}
        self.stats: dict[str, WindowStats] = {}
        self.replaced: dict[str, int] = {}
        self.next_step = 1
        self._watch(1)

    # --- when ---------------------------------------------------------------------------------
    def in_window(self, step: int) -> bool:
        """Whether optimizer step `step` (from 1) accumulates selection statistics."""
        cfg = self.cfg
        return step <= self.total_steps and (step - 1) % cfg.reselection_steps < cfg.selection_accumulation_steps

    def ends_window(self, step: int) -> bool:
        cfg = self.cfg
        return step <= self.total_steps and (step - 1) % cfg.reselection_steps == cfg.selection_accumulation_steps - 1

    def rate(self, step: int) -> float:
        """p(t): 1 at the first re-selection, then p0 times the decay of t / T."""
        if step == self.cfg.selection_accumulation_steps:
            return 1.0
        frac = min(1.0, step / self.total_steps)
        return max(0.0, self.cfg.initial_reselection_rate * DECAYS[self.cfg.reselection_decay](frac))

    # --- the schedule protocol ------------------------------------------------------------------
    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        for stats in self.stats.values():  # this step's gradient becomes one sample of the window
            stats.grad_sum += stats.step_sum
            stats.grad_sq_sum.addcmul_(stats.step_sum, stats.step_sum)
            stats.step_sum.zero_()
            stats.steps += 1
        if self.ends_window(step):
            self._reselect_after_step(optimizer, self.rate(step))
        self.next_step = step + 1
        self._watch(step + 1)

    def _watch(self, step: int) -> None:
        """Have the layers report dense gradients during step `step` when it is a window step."""
        for name, layer in self.layers.items():
            layer.gradient_observer = partial(self._observe, name) if self.in_window(step) else None

    @torch.no_grad()
    def _observe(self, name: str, dense_grad: torch.Tensor) -> None:
        flat = dense_grad.view(-1)
        stats = self.stats.get(name)
        if stats is None:
            index = torch.topk(flat.abs(), self.layers[name].k, sorted=False).indices
            zeros = torch.zeros_like(flat[index])
            self.stats[name] = WindowStats(index, flat[index].clone(), zeros, zeros.clone())
        else:
            stats.step_sum += flat[stats.index]

    def _reselect_after_step(self, optimizer: torch.optim.Optimizer | None, p: float) -> None:
        """Re-select after the optimizer's next step (now when there is no optimizer)."""
        if optimizer is None:
            self.reselect(p, None)
            return
        handle = None

        def once(opt, args, kwargs) -> None:
            handle.remove()
            self.reselect(p, opt)

        handle = optimizer.register_step_post_hook(once)

    # --- what -----------------------------------------------------------------------------------
    @torch.no_grad()
    def reselect(self, p: float, optimizer: torch.optim.Optimizer | None) -> None:
        """Drop and regrow floor(k p) entries per layer from the window's statistics, then clear them."""
        for name, layer in self.layers.items():
            stats = self.stats.get(name)
            if stats is None or stats.steps == 0:
                continue
            values, index = layer.sparse_values, layer.sparse_index
            slots, grow = plan_regrowth(index, values, stats.index, stats.grad_sum.abs(), math.floor(layer.k * p))
            index[slots] = stats.index[grow]
            values[slots] = 0.0
            if values.grad is not None:
                values.grad[slots] = 0.0
            state, group = _optimizer_state(optimizer, values)
            if state and "betas" in group:
                seed_moments(state, group["betas"], slots, stats.grad_sum[grow] / stats.steps,
                             stats.grad_sq_sum[grow] / stats.steps, layer.k)
            order = torch.argsort(index)
            tensors = [index, values.data, *([values.grad] if values.grad is not None else []),
                       *per_entry_state(state, layer.k).values()]
            for tensor in tensors:
                tensor.copy_(tensor[order])
            _broadcast_from_rank0(tensors)
            self.replaced[name] = slots.numel()
        self.stats.clear()

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state: dict = {"next_step": self.next_step, "steps": {n: s.steps for n, s in self.stats.items()},
                       "replaced": dict(self.replaced)}
        for name, stats in self.stats.items():
            for field in ("index", "step_sum", "grad_sum", "grad_sq_sum"):
                state[f"{name}.{field}"] = getattr(stats, field)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.next_step, self.replaced = int(state["next_step"]), dict(state.get("replaced", {}))
        self.stats = {}
        for name, steps in state["steps"].items():
            device = self.layers[name].sparse_index.device
            fields = {f: state[f"{name}.{f}"].to(device) for f in ("index", "step_sum", "grad_sum", "grad_sq_sum")}
            self.stats[name] = WindowStats(**fields, steps=int(steps))
        self._watch(self.next_step)


def _optimizer_state(optimizer: torch.optim.Optimizer | None, param: nn.Parameter) -> tuple[dict, dict]:
    """The optimizer's state of `param` and its param group ({} when it holds none yet)."""
    if optimizer is None or param not in optimizer.state:
        return {}, {}
    group = next((g for g in optimizer.param_groups if any(q is param for q in g["params"])), {})
    return optimizer.state[param], group


def _broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Make every rank hold rank 0's re-selection (each rank's statistics saw only its own batches)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


@register_schedule(SpIELConfig)
def make_schedule(model: nn.Module, cfg: SpIELConfig, total_steps: int | None) -> SpIELSchedule:
    """The re-selection schedule of a model with a SpIEL adapter."""
    return SpIELSchedule(model, cfg, total_steps)
