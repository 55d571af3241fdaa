"""Per-step work a method needs during training: regularizers and schedules (rank budgets, growth).

A method that needs more than `loss.backward(); optimizer.step()` registers a schedule factory for
its config class:

    @register_schedule(AdaLoRAConfig)
    def make(model, cfg, total_steps) -> MethodSchedule: ...

peftkit's training loop asks `schedule_for(model, total_steps)` and runs it as a callback. In a plain
PyTorch loop the user makes the same object once and calls one function per step:

    schedule = peftkit.schedule_for(model, total_steps=1000)   # None when the method needs none
    for step, batch in enumerate(loader, start=1):
        model(**batch).loss.backward()
        schedule.step(step, optimizer)      # regularizer gradient, importance, allocation
        optimizer.step(); optimizer.zero_grad()

`step` adds the regularizer's gradient itself (`extra_loss(model).backward()`), which equals adding
the term to the loss before backward; peftkit's own loop adds it to the loss instead, so that the
logged loss includes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .config import AdapterConfig

_FACTORIES: dict[str, Callable] = {}


class MethodSchedule:
    """Base of every method schedule; subclasses override what they need."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the training loss (a regularizer), or None."""
        return None

    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """After backward, before clipping and `optimizer.step()`; `step` counts optimizer steps from 1."""

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """The one call per optimizer step for a plain training loop (after `loss.backward()`)."""
        term = self.extra_loss(self.model)
        if term is not None and term.requires_grad:
            term.backward()
        self.on_after_backward(step, self.model, optimizer)

    def state_dict(self) -> dict:
        """Everything needed to resume the schedule exactly (tensors and JSON-able values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


def register_schedule(config_cls: type[AdapterConfig]) -> Callable:
    """Register `factory(model, cfg, total_steps) -> MethodSchedule` for `config_cls.method`."""

    def decorator(factory: Callable) -> Callable:
        _FACTORIES[config_cls.method] = factory
        return factory

    return decorator


def schedule_for(model: nn.Module, total_steps: int | None = None) -> MethodSchedule | None:
    """The schedule of the model's adapter method, or None when the method needs no per-step work.

    With several active adapters (trained together), one schedule runs each adapter's own, each seeing
    its adapter as the model's (`adapters.current`)."""
    from .adapters import active_adapters, current, get_state

    names = active_adapters(model)
    if len(names) <= 1:
        cfg = get_state(model).config
        factory = _FACTORIES.get(cfg.method)
        return None if factory is None else factory(model, cfg, total_steps)
    made = {}
    for name in names:
        cfg = get_state(model, name).config
        if cfg.method in _FACTORIES:
            with current(model, name):
                made[name] = _FACTORIES[cfg.method](model, cfg, total_steps)
    return _Each(model, made) if made else None


class _Each(MethodSchedule):
    """The schedules of several active adapters, each run as if its adapter were the model's only one."""

    def __init__(self, model: nn.Module, schedules: dict[str, MethodSchedule]) -> None:
        super().__init__(model)
        self.schedules = schedules

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        from .adapters import current

        terms = []
        for name, schedule in self.schedules.items():
            with current(model, name):
                terms.append(schedule.extra_loss(model))
        terms = [t for t in terms if t is not None]
        return sum(terms) if terms else None

    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        from .adapters import current

        for name, schedule in self.schedules.items():
            with current(model, name):
                schedule.on_after_backward(step, model, optimizer)

    def state_dict(self) -> dict:
        return {f"{name}/{key}": value for name, schedule in self.schedules.items()
                for key, value in schedule.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        for name, schedule in self.schedules.items():
            prefix = name + "/"
            schedule.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
