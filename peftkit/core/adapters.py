"""Named adapters: several adapters on one model, which of them are active, and how their state is kept.

    peftkit.apply(model, LoRAConfig(...), name="fr")       # the first one is called "default" unless named
    peftkit.load(model, "adapters/de", name="de")
    peftkit.adapters(model)                                # ["fr", "de"]
    peftkit.set_active(model, ["fr", "de"])                # stacked: both act, in the order applied
    peftkit.delete(model, "fr")

An adapter added to a model that has others becomes the only active (and trainable) one; `set_active`
changes that. A second adapter on a module already adapted wraps the first one's layer, so adapters of
any methods share modules (LoRA "fr" and (IA)^3 "de" on the same q_proj). An inactive adapter's layers
pass their input through, its parameters are frozen, and base parameters it trains in place (BitFit,
modules_to_save) hold their original values until it is active again.

`model.peftkit_state` is an `AdapterSet`; `get_state(model, name)` gives one adapter's `AdapterState`.
Called without a name it gives the adapter being applied or saved, else the only one, else the only
active one: single-adapter code (and every method file) never names adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .config import AdapterConfig, ConfigError
from .layer import AdapterLayer
from .model_adapter import ModelAdapter

STATE_ATTR = "peftkit_state"
DEFAULT = "default"


@dataclass
class AdapterState:
    """What `apply` did for one named adapter: enough to save it and to undo it exactly."""

    config: AdapterConfig
    adapted: list[str]
    """Names of the modules this adapter's layers sit on."""
    selected: list[str]
    """Base parameters it trains in place (selection methods and modules_to_save), by plain name."""
    requires_grad_before: dict[str, bool]
    fingerprint: dict[str, list]
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    """Copies of selected parameters, so `disabled()` can show the base model and `unload` restore it."""
    merged: bool = False
    name: str = DEFAULT
    layers: dict[str, AdapterLayer] = field(default_factory=dict)
    """Its AdapterLayers by module name (with stacked adapters, not always the module at that name)."""
    trainable: dict[tuple[str, str], bool] = field(default_factory=dict)
    """(module name, local name) -> requires_grad of its layers' parameters, restored on activation."""
    stash: dict[str, torch.Tensor] = field(default_factory=dict)
    """Trained values of its selected parameters while it is inactive (the originals are in the model)."""
    model_adapter: ModelAdapter | None = None
    """Its whole-model part (`core.model_adapter.ModelAdapter`), attached while the adapter is on the model."""


@dataclass
class AdapterSet:
    """Every named adapter of a model, the active ones, and the one being applied or saved."""

    states: dict[str, AdapterState]
    active: list[str]
    current: str | None = None

    def __getattr__(self, key: str):
        """`model.peftkit_state.config` and friends keep meaning the single adapter's state."""
        if key.startswith("__") or key in ("states", "active", "current"):
            raise AttributeError(key)
        return getattr(self.only(), key)

    def label(self) -> str:
        """How messages name the adapters: "lora", or "fr: lora, de: ia3"."""
        if len(self.states) == 1:
            return next(iter(self.states.values())).config.method
        return ", ".join(f"{n}: {s.config.method}" for n, s in self.states.items())

    def only(self) -> AdapterState:
        if self.current is not None:
            return self.states[self.current]
        if len(self.states) == 1:
            return next(iter(self.states.values()))
        if len(self.active) == 1:
            return self.states[self.active[0]]
        raise ConfigError(f"this model has {len(self.states)} adapters {list(self.states)} and "
                          f"{len(self.active)} active; name the one you mean (name=...)")


def adapter_set(model: nn.Module) -> AdapterSet | None:
    return getattr(model, STATE_ATTR, None)


def get_state(model: nn.Module, name: str | None = None) -> AdapterState:
    """One adapter's state (see the module docstring for which one without a name)."""
    found = adapter_set(model)
    if found is None:
        raise ConfigError("this model has no peftkit adapter; call peftkit.apply(model, config) first")
    if name is None:
        return found.only()
    if name not in found.states:
        raise ConfigError(f"this model has no adapter named {name!r}; its adapters: {list(found.states)}")
    return found.states[name]


def has_adapter(model: nn.Module) -> bool:
    """True when `peftkit.apply` (or `load`) was called on the model and not undone."""
    return getattr(model, STATE_ATTR, None) is not None


def adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were applied ([] without any)."""
    found = adapter_set(model)
    return list(found.states) if found else []


def active_adapters(model: nn.Module) -> list[str]:
    found = adapter_set(model)
    return list(found.active) if found else []


@contextlib.contextmanager
def current(model: nn.Module, name: str) -> Iterator[AdapterState]:
    """Inside the block, `get_state(model)` means adapter `name` (methods' code never names adapters)."""
    found = adapter_set(model)
    before, found.current = found.current, name
    try:
        yield found.states[name]
    finally:
        found.current = before


def layers_of(model: nn.Module, name: str | None = None) -> list[AdapterLayer]:
    """One adapter's layers, in the order they were applied."""
    return list(get_state(model, name).layers.values())


def plain_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The user's own parameters by the names they have without adapters (`q_proj.base.bias` -> `q_proj.bias`);
    adapter parameters are left out."""
    out: dict[str, nn.Parameter] = {}
    _collect_plain(model, "", out)
    return out


def _collect_plain(module: nn.Module, prefix: str, out: dict[str, nn.Parameter]) -> None:
    while isinstance(module, AdapterLayer):
        module = module._modules["base"]
    for local, p in module._parameters.items():
        if p is not None and id(p) not in {id(q) for q in out.values()}:
            out[prefix + local] = p
    for child_name, child in module._modules.items():
        if child is not None:
            _collect_plain(child, f"{prefix}{child_name}.", out)


def plain_name_map(model: nn.Module) -> dict[str, str]:
    """model.named_parameters() name -> plain name, for the user's own parameters."""
    plain = {id(p): n for n, p in plain_parameters(model).items()}
    return {n: plain[id(p)] for n, p in model.named_parameters() if id(p) in plain}


def set_active(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make `names` the active adapters (one, or several stacked in the order they were applied).

    The others pass their input through and are frozen; base parameters they train in place get their
    original values back until they are active again. A merged adapter stays active (unmerge it first).
    """
    names = [names] if isinstance(names, str) else list(names)
    found = adapter_set(model)
    if found is None:
        raise ConfigError("this model has no peftkit adapter; call peftkit.apply(model, config) first")
    unknown = [n for n in names if n not in found.states]
    if unknown:
        raise ConfigError(f"no adapter named {unknown}; this model's adapters: {list(found.states)}")
    for name, state in found.states.items():
        if name not in names and state.merged:
            raise ConfigError(f"adapter {name!r} is merged into the base weights; call peftkit.unmerge(model, "
                              f"{name!r}) before deactivating it")
        if name not in names and state.selected and not state.originals:
            raise ConfigError(f"adapter {name!r} ({state.config.method}) trains the base weights in place and keeps "
                              "no originals, so it cannot be switched off; delete it or keep it active")
    for name, state in found.states.items():
        _switch(model, state, name in names)
    found.active = [n for n in found.states if n in names]
    return model


@torch.no_grad()
def _switch(model: nn.Module, state: AdapterState, on: bool) -> None:
    for module_name, layer in state.layers.items():
        layer.is_active = on
        for local, p in layer.adapter_tensors().items():
            if isinstance(p, nn.Parameter):
                p.requires_grad_(on and state.trainable.get((module_name, local), True))
    params = plain_parameters(model)
    if on and state.stash:
        for n, value in state.stash.items():
            params[n].copy_(value)
        state.stash = {}
    elif not on and not state.stash and state.originals:
        state.stash = {n: params[n].detach().clone() for n in state.originals}
        for n, original in state.originals.items():
            params[n].copy_(original)
    for n in state.selected:
        params[n].requires_grad_(on)


def record_trainable(state: AdapterState) -> None:
    """Remember which of the new adapter's parameters train (a frozen basis stays frozen when re-activated)."""
    state.trainable = {(m, local): p.requires_grad for m, layer in state.layers.items()
                       for local, p in layer.adapter_tensors().items() if isinstance(p, nn.Parameter)}
