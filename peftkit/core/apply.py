"""apply / unload / delete: the life cycle of named adapters on a user's model.

There is no wrapper class: `apply` mutates the model in place (replacing matched modules with
AdapterLayers, freezing everything else) and records what it did in `model.peftkit_state` (an
`adapters.AdapterSet`), so that `unload` can put back exactly what was there. Merging and `disabled`
live in `fold.py`, names and activation in `adapters.py`, mixed-adapter batches in `routing.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn

from . import routing, weights
from .adapters import (
    DEFAULT,
    STATE_ATTR,
    AdapterSet,
    AdapterState,
    adapter_set,
    current,
    get_state,
    has_adapter,
    layers_of,
    plain_name_map,
    plain_parameters,
    record_trainable,
    set_active,
)
from .config import AdapterConfig, ConfigError
from .fold import disabled, merge, unmerge
from .inject import find_targets, get_module, swap_module
from .layer import AdapterLayer
from .model_adapter import ModelAdapter
from .params import freeze, parameters_of_modules
from .registry import get_method
from .snapshot import ModelSnapshot
from .tying import SharedTensors, settle_config, warn_untied

__all__ = ["AdapterState", "STATE_ATTR", "adapter_layers_of", "apply", "delete", "disabled", "fingerprint",
           "get_state", "has_adapter", "merge", "unload", "unmerge"]


def adapter_layers_of(model: nn.Module, name: str | None = None) -> list[AdapterLayer]:
    """An adapter's AdapterLayers, in the order they were applied."""
    return layers_of(model, name)


def fingerprint(model: nn.Module, names: list[str]) -> dict[str, list]:
    """{module name: [weight shape, weight_checksum]} of the named base modules (it is saved with the adapter)."""
    out = {}
    for name in names:
        try:
            module = weights.plain(get_module(model, name))
        except AttributeError:
            continue  # reported as missing by the caller
        if weights.layer_kind(module) is not None:
            out[name] = [list(weights.get_weight(module).shape), weights.weight_checksum(module)]
    return out


def apply(model: nn.Module, cfg: AdapterConfig, *, name: str | None = None, replace: bool = False,
          init: bool = True, fill: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Add the adapter described by `cfg` to `model` in place and return the model.

    All or nothing: when anything fails (a config error in the fifth module, an exception in a method's
    init, MemoryError, KeyboardInterrupt ...), the model is put back exactly as it was: the same module
    objects at every name, the same tensors bit for bit, the same `requires_grad` flags, no hooks and no
    `peftkit_state` left (see `core.snapshot`; base tensors are copied only where an init rewrites them).

    Args:
        model: any torch module (a transformers model, a plain MLP ...).
        cfg: a method config such as `LoRAConfig(r=8, targets=["q_proj", "v_proj"])`.
        name: the adapter's name ("default" for the first); a model holds several named adapters (see
            `adapters.py`): the new one becomes the only active one (merged adapters stay on).
        replace: remove the adapter of that name first (without a name: every adapter); if the new one then
            fails, the old one is back in place.
        init: run the method's initialisation; `load` passes False and fills the weights itself.
        fill: called with the adapted model before `apply` returns (`load` copies the file's tensors in);
            its failures roll back like any other.
    """
    found = adapter_set(model)
    if found is not None and not replace and (name is None or name in found.states):
        what = f"an adapter named {name!r}" if name else f"a peftkit adapter ({found.label()})"
        raise ConfigError(f"model already has {what}; call peftkit.unload(model) first, pass replace=True, or give "
                          "the new adapter another name (peftkit.apply(model, config, name=...))")
    explicit, name = name is not None, DEFAULT if name is None else name
    _check_name(name)
    method = get_method(cfg)
    undo = ModelSnapshot(model)
    attached: list[ModelAdapter] = []
    try:
        if found is not None and replace:  # the named adapter, or without a name every adapter
            doomed = [] if explicit and name not in found.states else [name] if explicit else list(found.states)
            _keep_what_unload_writes(model, doomed, undo)
            for old in reversed(doomed):
                unload(model, old)
        if adapter_set(model) is not None:  # the new adapter's init sees the base (plus what cannot switch off)
            _keep_selected_values(model, undo)
            found = adapter_set(model)  # copies of the states: a rollback puts back the set holding the old ones
            setattr(model, STATE_ATTR, dataclasses.replace(
                found, states={n: dataclasses.replace(s) for n, s in found.states.items()}, active=list(found.active)))
            set_active(model, _always_on(model))
        _attach(model, cfg, method, name, init, undo, attached)
        if fill is not None:  # it overwrites selected parameters: their originals are the values to restore
            state, params = get_state(model, name), plain_parameters(model)
            undo.keep_tensors([(params[n], state.originals.get(n)) for n in state.selected])
            with current(model, name):
                fill(model)
        set_active(model, [*_always_on(model), name])
    except BaseException:
        for part in attached:  # hooks a ModelAdapter installed (also half way); the snapshot does the rest
            with contextlib.suppress(Exception):
                part.detach(model)
        undo.restore()
        raise
    return model


def _always_on(model: nn.Module) -> list[str]:
    """Adapters that stay active when another is added: merged ones, and ones that keep no base to go back to."""
    return [n for n, s in adapter_set(model).states.items() if s.merged or (s.selected and not s.originals)]


def _keep_selected_values(model: nn.Module, undo: ModelSnapshot) -> None:
    params = plain_parameters(model)
    undo.keep_tensors([(params[n], None) for s in adapter_set(model).states.values() for n in s.originals])


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name == routing.BASE or "/" in name or name.startswith("."):
        raise ConfigError(f"adapter name {name!r} must be a non-empty string, not {routing.BASE!r}, without '/' and "
                          "not starting with '.' (it names a subdirectory when saved)")


def _attach(model, cfg, method, name: str, init: bool, undo: ModelSnapshot, attached: list[ModelAdapter]) -> None:
    found = adapter_set(model)
    before = dict(next(iter(found.states.values())).requires_grad_before) if found else \
        {n: p.requires_grad for n, p in plain_parameters(model).items()}
    targets = find_targets(model, cfg) if method.build is not None else []
    prints = fingerprint(model, targets)
    freeze(model)
    state = AdapterState(cfg, [], [], before, prints, name=name)
    states = dict(found.states) if found else {}
    setattr(model, STATE_ATTR, AdapterSet({**states, name: state}, list(found.active) if found else [], name))
    router = routing.install(model, list(states) + [name])
    state.layers = _wrap_modules(model, cfg, method.build, targets, init, undo)
    state.adapted = list(state.layers)
    plain = plain_name_map(model) | {n: n for n in plain_parameters(model)}  # a method may name either
    selected = sorted({plain[n] for n in (method.select(model, cfg) if method.select else []) if n in plain})
    # a typo must not leave a fresh head frozen; a file's list was checked when it was trained, and peft
    # files list the heads peft adds for every classification model ("classifier", "score")
    selected += [plain[n] for n in parameters_of_modules(model, cfg.modules_to_save, strict=init) if n in plain]
    _refuse_shared_selection(states, name, selected)
    params = plain_parameters(model)
    for n in selected:
        params[n].requires_grad_(True)
    state.selected = selected
    if not state.layers and not prints:
        state.fingerprint = fingerprint(model, _untouched_linear(model, selected))
    state.originals = _snapshot(params, selected, cfg)
    record_trainable(state)
    adapter_set(model).current = None
    for layer in state.layers.values():
        layer.adapter_name, layer.router = name, router
    state.model_adapter = (method.model_adapter or ModelAdapter)(cfg)  # the default one only keeps the layers
    attached.append(state.model_adapter)
    with current(model, name):
        state.model_adapter.attach(model, state.layers)


def _refuse_shared_selection(states: dict[str, AdapterState], name: str, selected: list[str]) -> None:
    for other, state in states.items():
        both = sorted(set(state.selected) & set(selected))
        if both:
            raise ConfigError(f"adapter {name!r} would train base parameters that adapter {other!r} trains in place "
                              f"({', '.join(both[:3])}{' ...' if len(both) > 3 else ''}); two adapters cannot share "
                              "a base parameter they train: delete the other first or choose other modules")


def _wrap_modules(model, cfg, build, targets: list[str], init: bool, undo: ModelSnapshot) -> dict[str, AdapterLayer]:
    adapted: dict[str, AdapterLayer] = {}
    shared: SharedTensors | None = None
    for name in targets:
        module = get_module(model, name)
        layer = build(weights.plain(module), cfg, name)  # a method sees the user's module, even under adapters
        if layer is None:
            continue
        if module is not layer.base:  # stacked on another adapter's layer: wrap that layer
            if layer.rewrites_base:
                raise ConfigError(f"{cfg.method}'s init rewrites the base weight of {name}, which adapter "
                                  f"{module.adapter_name!r} already adapts (two adapters cannot share a module whose weight one rewrites); apply {cfg.method} first or on other modules")
            layer.base = module
        layer.train(module.training)  # a new dropout must not be active in an eval-mode model
        if layer.rewrites_base:  # PiSSA's residual: copy the base to roll back to, untie a shared weight
            shared = shared or SharedTensors(model)
            ties = shared.outside(module, module)
            undo.keep(module, skip_values=tuple(ties))
            if ties:
                warn_untied(name, ties, f"{cfg.method}'s init rewrites the base weight")
                layer.untie(list(ties))
        swap_module(model, module, layer)
        adapted[name] = layer
        if init:
            layer.reset_parameters()
    if targets and not adapted:
        kinds = sorted({type(get_module(model, n)).__name__ for n in targets})
        raise ConfigError(f"{cfg.method} supports none of the matched module types {kinds}, or its config selects "
                          f"none of the matched modules {targets[:4]}{' ...' if len(targets) > 4 else ''} "
                          f"(e.g. layers or heads this model lacks)")
    return adapted


def _keep_what_unload_writes(model: nn.Module, names: list[str], undo: ModelSnapshot) -> None:
    """Before `apply(replace=True)` unloads adapters: the values unload overwrites, so that a failure of the
    new adapter can put the old ones back exactly."""
    params = plain_parameters(model)
    for name in names:
        state = get_state(model, name)
        for layer in state.layers.values():
            if not layer.merged and layer.rewrites_base:
                undo.keep(layer.plain_base)
        if not state.merged:
            undo.keep_tensors([(params[n], None) for n in state.originals])


def _untouched_linear(model: nn.Module, selected: list[str]) -> list[str]:
    """A few frozen layers to fingerprint when a method adds no modules (first and last)."""
    chosen = {n.rsplit(".", 1)[0] for n in selected}
    names = [n for n, m in model.named_modules() if weights.layer_kind(m) and n not in chosen]
    return names[:1] + names[-1:] if len(names) > 1 else names


def _snapshot(params: dict[str, nn.Parameter], selected: list[str], cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    if not getattr(cfg, "keep_original", True):
        return {}
    return {n: params[n].detach().clone() for n in selected}


def _remove(model: nn.Module, state: AdapterState, originals: dict[str, torch.Tensor]) -> None:
    """Take one adapter's layers out (each replaced by what it wraps, wherever it is held). A merged layer
    keeps its merged weights; an unmerged one undoes what its init did to the base and gets its tied
    parameters back. `originals`: selected parameters to put back."""
    params = plain_parameters(model)
    with torch.no_grad():
        for n, original in originals.items():
            params[n].copy_(original)
    if state.model_adapter is not None:
        state.model_adapter.detach(model)
    for layer in reversed(list(state.layers.values())):
        if not layer.merged:
            layer.restore_base()
            layer.retie()
        swap_module(model, layer, layer.base)


def unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter `name` (without a name: every adapter) and return the model.

    Merged layers leave their merged weights in the base (call `merge` first to keep the
    adaptation); unmerged ones leave the original base weights (bit for bit, except after a
    base-rewriting init such as PiSSA/OLoRA, whose residual is added back: exact up to rounding, see
    LoRA's module docstring). Selected parameters (selection methods, DiffFit's biases) likewise keep their
    trained values after `merge` and get their originals back otherwise (full fine-tuning keeps no
    originals: its trained weights stay). When the last adapter goes, parameters get back the
    `requires_grad` flags they had before the first `apply`. A merged layer whose base weight was tied to
    another module stays untied (the two now differ); for transformers' embedding tie the config's
    `tie_word_embeddings` is set to False.
    """
    found = adapter_set(model)
    if found is None:
        get_state(model)  # raises the usual error
    for each in ([name] if name is not None else list(reversed(list(found.states)))):
        _unload_one(model, each)
    return model


def _unload_one(model: nn.Module, name: str) -> None:
    found, state = adapter_set(model), get_state(model, name)
    originals = {} if state.merged else state.originals
    if state.stash:  # inactive: the model holds the originals, the stash the trained values
        originals = state.stash if state.merged else {}
    untied = [f"{module}.{local}" for module, layer in state.layers.items() if layer.merged for local in layer.tied]
    _remove(model, state, originals)
    rest = {n: s for n, s in found.states.items() if n != name}
    if rest:
        setattr(model, STATE_ATTR, AdapterSet(rest, [n for n in found.active if n != name]))
        routing.install(model, list(rest))
        for n in state.selected:
            plain_parameters(model)[n].requires_grad_(False)
    else:
        for n, p in plain_parameters(model).items():
            p.requires_grad_(state.requires_grad_before.get(n, p.requires_grad))
        delattr(model, STATE_ATTR)
        routing.uninstall(model)
    if untied:
        settle_config(model, untied)


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name` and give the base back what it had (a merged adapter is unmerged first)."""
    if get_state(model, name).merged:
        unmerge(model, name)
    return unload(model, name)
