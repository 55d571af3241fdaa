"""apply / unload / merge / unmerge / disabled: the life cycle of an adapter on a user's model.

There is no wrapper class: `apply` mutates the model in place (replacing matched modules with
AdapterLayers, freezing everything else) and records what it did in `model.peftkit_state`, so that
`unload` can put back exactly what was there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import weights
from .config import AdapterConfig, ConfigError
from .inject import find_targets, get_module, replace_module
from .layer import AdapterLayer, MergeError
from .params import freeze, parameters_of_modules
from .registry import get_method

STATE_ATTR = "peftkit_state"


@dataclass
class AdapterState:
    """What `apply` did to a model: enough to save the adapter and to undo it exactly."""

    config: AdapterConfig
    adapted: list[str]
    """Names of the modules replaced by AdapterLayers."""
    selected: list[str]
    """Names of existing parameters made trainable (selection methods and modules_to_save)."""
    requires_grad_before: dict[str, bool]
    fingerprint: dict[str, list]
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    """Copies of selected parameters, so `disabled()` can show the base model and `unload` restore it."""
    merged: bool = False
    """Set by `merge`: selected parameters are trained in place, so for them merging only decides
    what `unload` leaves (the trained values when merged, the originals otherwise)."""


def get_state(model: nn.Module) -> AdapterState:
    """The model's adapter state; raises when no adapter was applied."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ConfigError("this model has no peftkit adapter; call peftkit.apply(model, config) first")
    return state


def has_adapter(model: nn.Module) -> bool:
    """True when `peftkit.apply` (or `load`) was called on the model and not undone."""
    return getattr(model, STATE_ATTR, None) is not None


def fingerprint(model: nn.Module, names: list[str]) -> dict[str, list]:
    """{module name: [weight shape, [sum, sum of |w|]]} of the named base modules (compact: it is saved)."""
    out = {}
    for name in names:
        try:
            module = get_module(model, name)
        except AttributeError:
            continue  # reported as missing by the caller
        module = module.base if isinstance(module, AdapterLayer) else module
        if weights.layer_kind(module) is not None:
            out[name] = [list(weights.get_weight(module).shape), weights.weight_checksum(module)]
    return out


def apply(model: nn.Module, cfg: AdapterConfig, *, replace: bool = False, init: bool = True) -> nn.Module:
    """Add the adapter described by `cfg` to `model` in place and return the model.

    Args:
        model: any torch module (a transformers model, a plain MLP ...).
        cfg: a method config such as `LoRAConfig(r=8, targets=["q_proj", "v_proj"])`.
        replace: unload an adapter already on the model first (otherwise that is an error).
        init: run the method's initialisation; `load` passes False and fills the weights itself.
    """
    if has_adapter(model):
        if not replace:
            raise ConfigError(
                f"model already has a peftkit adapter ({get_state(model).config.method}); "
                "call peftkit.unload(model) first or pass replace=True"
            )
        unload(model)
    method = get_method(cfg)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    adapted: list[str] = []
    try:
        targets = find_targets(model, cfg) if method.build is not None else []
        prints = fingerprint(model, targets)
        freeze(model)
        adapted = _wrap_modules(model, cfg, method.build, targets, init)
        selected = sorted(set(method.select(model, cfg) if method.select else []))
        selected += parameters_of_modules(model, cfg.modules_to_save)
        _unfreeze(model, selected)
        if not adapted and not prints:
            prints = fingerprint(model, _untouched_linear(model, selected))
        originals = _snapshot(model, selected, cfg)
        state = AdapterState(cfg, adapted, selected, before, prints, originals)
        setattr(model, STATE_ATTR, state)
        for name in adapted:
            get_module(model, name).on_attach(model)
    except BaseException:
        _restore(model, adapted, before, rollback=True)
        raise
    return model


def _wrap_modules(model, cfg, build, targets: list[str], init: bool) -> list[str]:
    adapted = []
    for name in targets:
        module = get_module(model, name)
        layer = build(module, cfg, name)
        if layer is None:
            continue
        layer.train(module.training)  # a new dropout must not be active in an eval-mode model
        replace_module(model, name, layer)
        adapted.append(name)
        if init:
            layer.reset_parameters()
    if targets and not adapted:
        kinds = sorted({type(get_module(model, n)).__name__ for n in targets})
        raise ConfigError(f"{cfg.method} supports none of the matched module types {kinds}, or its config selects "
                          f"none of the matched modules {targets[:4]}{' ...' if len(targets) > 4 else ''} "
                          f"(e.g. layers or heads this model lacks)")
    return adapted


def _unfreeze(model: nn.Module, names: list[str]) -> None:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)


def _untouched_linear(model: nn.Module, selected: list[str]) -> list[str]:
    """A few frozen layers to fingerprint when a method adds no modules (first and last)."""
    chosen = {n.rsplit(".", 1)[0] for n in selected}
    names = [n for n, m in model.named_modules() if weights.layer_kind(m) and n not in chosen]
    return names[:1] + names[-1:] if len(names) > 1 else names


def _snapshot(model: nn.Module, selected: list[str], cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    if not getattr(cfg, "keep_original", True):
        return {}
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in selected}


def _restore(model: nn.Module, adapted: list[str], requires_grad: dict[str, bool], rollback: bool,
             originals: dict[str, torch.Tensor] | None = None) -> None:
    """Put the original modules back. A merged layer keeps its merged weights unless rolling back.

    `originals` (selected parameters to put back) are keyed by the adapted model's parameter names,
    so they are copied before the wrappers go.
    """
    if originals:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, original in originals.items():
                params[n].copy_(original)
    for name in reversed(adapted):
        layer = get_module(model, name)
        if isinstance(layer, AdapterLayer):
            if layer.merged and rollback:
                layer.unmerge()
            if not layer.merged:
                layer.restore_base()
            layer.on_detach(model)
            replace_module(model, name, layer.base)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(n, p.requires_grad))
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)


def adapter_layers_of(model: nn.Module) -> list[AdapterLayer]:
    """The model's AdapterLayers, in the order they were applied."""
    return [get_module(model, n) for n in get_state(model).adapted]


def merge(model: nn.Module, safe: bool = True) -> nn.Module:
    """Fold every adapter layer into its base weights (outputs unchanged, no extra latency)."""
    layers = adapter_layers_of(model)
    blocked = sorted({type(layer).__name__ for layer in layers if not layer.mergeable})
    if blocked:
        raise MergeError(f"{', '.join(blocked)} cannot be merged (not a weight-space method); use it unmerged")
    merged: list[AdapterLayer] = []
    try:
        for layer in layers:
            layer.merge(safe=safe)
            merged.append(layer)
    except MergeError:
        for layer in merged:
            layer.unmerge()
        raise
    get_state(model).merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`."""
    for layer in adapter_layers_of(model):
        layer.unmerge()
    get_state(model).merged = False
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter modules and return the plain model.

    Merged layers leave their merged weights in the base (call `merge` first to keep the
    adaptation); unmerged ones leave the original base weights. Selected parameters (selection
    methods, DiffFit's biases) likewise keep their trained values after `merge` and get their
    originals back otherwise (full fine-tuning keeps no originals: its trained weights stay).
    Parameters get back the `requires_grad` flags they had before `apply`.
    """
    state = get_state(model)
    originals = {} if state.merged else state.originals
    _restore(model, state.adapted, state.requires_grad_before, rollback=False, originals=originals)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model exactly, inside the block, then re-enable the adapter."""
    state = get_state(model)
    if state.selected and not state.originals:
        raise ConfigError(f"{state.config.method} trains base weights in place; there is no base model to return to")
    layers = adapter_layers_of(model)
    if any(layer.merged for layer in layers):
        raise MergeError("the adapter is merged; call peftkit.unmerge(model) before disabling it")
    params = dict(model.named_parameters())
    trained = {n: params[n].detach().clone() for n in state.originals}
    try:
        for layer in layers:
            layer.enabled = False
        with torch.no_grad():
            for n, original in state.originals.items():
                params[n].copy_(original)
        yield model
    finally:
        for layer in layers:
            layer.enabled = True
        with torch.no_grad():
            for n, value in trained.items():
                params[n].copy_(value)
