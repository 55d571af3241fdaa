"""Undo logs that put a model back exactly: what `apply`'s and `merge`'s all-or-nothing promises rest on.

"Exactly" means the user's own objects: the same module at every name, the same Parameter objects,
the same values bit for bit, the same `requires_grad` flags, and no hook or attribute left behind.
`copy.deepcopy(model)` would double the memory and give back other objects, so instead

* `ModelSnapshot` records the structure, which is cheap: a shallow copy of every module's attributes
  (its child modules, parameter and buffer slots, hook dicts, flags); values are copied only for the
  modules an operation declares it will write into (`keep`);
* `TensorSnapshot` copies the parameters and buffers of one module (a base layer before a merge or a
  base-rewriting init), onto the CPU so that a model filling an accelerator's memory can still be
  snapshotted. Restoring copies the values back into the same tensors: a copy is bit-exact, where
  subtracting an update again is exact only up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

_SLOTS = ("_parameters", "_buffers")


def _copy(t: torch.Tensor) -> torch.Tensor | None:
    if t.is_meta:
        return None  # a meta tensor holds no values to lose
    return t.detach().to("cpu", copy=True)


class TensorSnapshot:
    """Which tensor sits in each parameter/buffer slot of a module (and its children), and their values.

    `skip_values`: slot names (of the module itself) whose tensor is recorded but not copied, because the
    caller guarantees it is not written (a tied Parameter that the module swaps for a private copy).
    """

    def __init__(self, module: nn.Module, skip_values: tuple[str, ...] = ()) -> None:
        self.slots = [(m, kind, dict(getattr(m, kind))) for m in module.modules() for kind in _SLOTS]
        skip = {id(module._parameters.get(n)) for n in skip_values}
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for _, _, slots in self.slots:
            for t in slots.values():
                if t is not None and id(t) not in self.values and id(t) not in skip:
                    self.values[id(t)] = (t, _copy(t))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every recorded tensor back in its slot (dropping slots added since) with its recorded values."""
        for module, kind, slots in self.slots:
            current = getattr(module, kind)
            current.clear()
            current.update(slots)
        for t, value in self.values.values():
            if value is not None:
                t.copy_(value)


class ModelSnapshot:
    """The structure of every module of a model, its parameters' flags, and the values of kept tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, dict(m.__dict__), _contents(m)) for m in model.modules()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.values: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._kept: set[int] = set()

    def keep(self, module: nn.Module, skip_values: tuple[str, ...] = ()) -> None:
        """Also record the values of `module`'s tensors (call before something writes into them)."""
        self.keep_tensors(list(TensorSnapshot(module, skip_values).values.values()))

    def keep_tensors(self, pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Record (tensor, value to restore); a value of None is copied now."""
        for t, value in pairs:
            if id(t) not in self._kept:
                self._kept.add(id(t))
                self.values.append((t, _copy(t) if value is None else value))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the model back as it was when the snapshot was taken."""
        for module, attrs, contents in self.modules:
            for key in [k for k in module.__dict__ if k not in attrs]:
                del module.__dict__[key]
            for key, value in attrs.items():
                if module.__dict__.get(key) is not value:
                    module.__dict__[key] = value
            for key, saved in contents.items():
                container = attrs[key]
                container.clear()
                container.update(saved)
        for t, value in self.values:
            if value is not None:
                t.copy_(value)
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _contents(module: nn.Module) -> dict[str, dict | set]:
    """Shallow copies of a module's dict and set attributes: children, parameter/buffer slots, hook dicts."""
    return {k: v.copy() for k, v in module.__dict__.items() if isinstance(v, dict | set)}
