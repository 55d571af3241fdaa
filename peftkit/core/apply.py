"""apply / unload / merge / unmerge / disabled: the life cycle of an adapter on a user's model.

There is no wrapper class: `apply` mutates the model in place (replacing matched modules with
AdapterLayers, freezing everything else) and records what it did in `model.peftkit_state`, so that
`unload` can put back exactly what was there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import weights
from .config import AdapterConfig, ConfigError
from .inject import find_targets, get_module, replace_module
from .layer import AdapterLayer, MergeError
from .params import freeze, parameters_of_modules
from .registry import get_method
from .snapshot import ModelSnapshot
from .tying import SharedTensors, settle_config, warn_untied

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
    """{module name: [weight shape, weight_checksum]} of the named base modules (it is saved with the adapter)."""
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


def apply(model: nn.Module, cfg: AdapterConfig, *, replace: bool = False, init: bool = True,
          fill: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Add the adapter described by `cfg` to `model` in place and return the model.

    All or nothing: when anything fails (a config error in the fifth module, an exception in a method's
    init, MemoryError, KeyboardInterrupt ...), the model is put back exactly as it was: the same module
    objects at every name, the same tensors bit for bit, the same `requires_grad` flags, no hooks and no
    `peftkit_state` left (see `core.snapshot`; base tensors are copied only where an init rewrites them).

    Args:
        model: any torch module (a transformers model, a plain MLP ...).
        cfg: a method config such as `LoRAConfig(r=8, targets=["q_proj", "v_proj"])`.
        replace: unload an adapter already on the model first (otherwise that is an error); if the new one
            then fails, the old one is back in place.
        init: run the method's initialisation; `load` passes False and fills the weights itself.
        fill: called with the adapted model before `apply` returns (`load` copies the file's tensors in);
            its failures roll back like any other.
    """
    if has_adapter(model) and not replace:
        raise ConfigError(f"model already has a peftkit adapter ({get_state(model).config.method}); "
                          "call peftkit.unload(model) first or pass replace=True")
    method = get_method(cfg)
    undo = ModelSnapshot(model)
    attached: list[AdapterLayer] = []
    try:
        if has_adapter(model):
            _keep_what_unload_writes(model, undo)
            unload(model)
        _attach(model, cfg, method, init, undo, attached)
        if fill is not None:  # it overwrites selected parameters: their originals are the values to restore
            params, originals = dict(model.named_parameters()), get_state(model).originals
            undo.keep_tensors([(params[n], originals.get(n)) for n in get_state(model).selected])
            fill(model)
    except BaseException:
        for layer in reversed(attached):  # what on_attach installed outside the model; the snapshot does the rest
            with contextlib.suppress(Exception):
                layer.on_detach(model)
        undo.restore()
        raise
    return model


def _attach(model, cfg, method, init: bool, undo: ModelSnapshot, attached: list[AdapterLayer]) -> None:
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    targets = find_targets(model, cfg) if method.build is not None else []
    prints = fingerprint(model, targets)
    freeze(model)
    adapted = _wrap_modules(model, cfg, method.build, targets, init, undo)
    selected = sorted(set(method.select(model, cfg) if method.select else []))
    # a typo must not leave a fresh head frozen; a file's list was checked when it was trained, and peft
    # files list the heads peft adds for every classification model ("classifier", "score")
    selected += parameters_of_modules(model, cfg.modules_to_save, strict=init)
    _unfreeze(model, selected)
    if not adapted and not prints:
        prints = fingerprint(model, _untouched_linear(model, selected))
    originals = _snapshot(model, selected, cfg)
    setattr(model, STATE_ATTR, AdapterState(cfg, adapted, selected, before, prints, originals))
    for name in adapted:
        layer = get_module(model, name)
        layer.on_attach(model)
        attached.append(layer)


def _wrap_modules(model, cfg, build, targets: list[str], init: bool, undo: ModelSnapshot) -> list[str]:
    adapted: list[str] = []
    shared: SharedTensors | None = None
    for name in targets:
        module = get_module(model, name)
        layer = build(module, cfg, name)
        if layer is None:
            continue
        layer.train(module.training)  # a new dropout must not be active in an eval-mode model
        if layer.rewrites_base:  # PiSSA's residual: copy the base to roll back to, untie a shared weight
            shared = shared or SharedTensors(model)
            ties = shared.outside(module, module)
            undo.keep(module, skip_values=tuple(ties))
            if ties:
                warn_untied(name, ties, f"{cfg.method}'s init rewrites the base weight")
                layer.untie(list(ties))
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


def _keep_what_unload_writes(model: nn.Module, undo: ModelSnapshot) -> None:
    """Before `apply(replace=True)` unloads the current adapter: the values unload overwrites, so that a
    failure of the new adapter can put the old one back exactly."""
    state = get_state(model)
    for layer in adapter_layers_of(model):
        if not layer.merged and layer.rewrites_base:
            undo.keep(layer.base)
    if not state.merged and state.originals:
        params = dict(model.named_parameters())
        undo.keep_tensors([(params[n], None) for n in state.originals])


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


def _restore(model: nn.Module, adapted: list[str], requires_grad: dict[str, bool],
             originals: dict[str, torch.Tensor] | None = None) -> None:
    """Put the original modules back. A merged layer keeps its merged weights; an unmerged one undoes what
    its init did to the base and gets its tied parameters back.

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
            if not layer.merged:
                layer.restore_base()
                layer.retie()
            layer.on_detach(model)
            replace_module(model, name, layer.base)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(n, p.requires_grad))
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)


def adapter_layers_of(model: nn.Module) -> list[AdapterLayer]:
    """The model's AdapterLayers, in the order they were applied."""
    return [get_module(model, n) for n in get_state(model).adapted]


def merge(model: nn.Module, safe: bool = True, keep_base: bool = False) -> nn.Module:
    """Fold every adapter layer into its base weights (outputs unchanged, no extra latency).

    All or nothing: each layer's base tensors are copied (to CPU memory) before it is written, so when a
    later layer fails (non-finite values with `safe`, any exception) every layer merged so far gets the
    very bits it had back. Base tensors shared with other modules (tied embeddings) are merged into a
    private copy, with a warning, so the other module keeps its weights (see `core.tying`).

    Args:
        safe: refuse non-finite merged weights.
        keep_base: keep the copies after the merge, so `unmerge` restores the base bit for bit (memory:
            one copy of every adapted base weight); otherwise `unmerge` subtracts the update again,
            exact up to rounding (see `AdapterLayer.unmerge`).
    """
    names, layers = get_state(model).adapted, adapter_layers_of(model)
    blocked = sorted({type(layer).__name__ for layer in layers if not layer.mergeable})
    if blocked:
        raise MergeError(f"{', '.join(blocked)} cannot be merged (not a weight-space method); use it unmerged")
    shared = SharedTensors(model)
    merged: list[AdapterLayer] = []
    untied: list[tuple[str, dict[str, list[str]]]] = []
    try:
        for name, layer in zip(names, layers, strict=True):
            if layer.merged:
                continue
            ties = shared.outside(layer.base, layer)
            layer.merge(safe=safe, keep_base=True, untie=list(ties))
            merged.append(layer)
            if ties:
                untied.append((name, ties))
    except BaseException:
        for layer in reversed(merged):
            layer.unmerge()  # restores the copy: bit-exact
        raise
    if not keep_base:
        for layer in merged:
            layer.forget_base()
    get_state(model).merged = True
    for name, ties in untied:
        warn_untied(name, ties, "merging writes the update into the weight")
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (bit-exact with `merge(keep_base=True)` and for tied weights; see `AdapterLayer.unmerge`)."""
    for layer in adapter_layers_of(model):
        layer.unmerge()
    get_state(model).merged = False
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter modules and return the plain model.

    Merged layers leave their merged weights in the base (call `merge` first to keep the
    adaptation); unmerged ones leave the original base weights (bit for bit, except after a
    base-rewriting init such as PiSSA/OLoRA, whose residual is added back: exact up to rounding, see
    LoRA's module docstring). Selected parameters (selection methods, DiffFit's biases) likewise keep their
    trained values after `merge` and get their originals back otherwise (full fine-tuning keeps no
    originals: its trained weights stay). Parameters get back the `requires_grad` flags they had
    before `apply`. A merged layer whose base weight was tied to another module stays untied (the two
    now differ); for transformers' embedding tie the config's `tie_word_embeddings` is set to False.
    """
    state = get_state(model)
    originals = {} if state.merged else state.originals
    untied = [f"{name}.{local}" for name, layer in zip(state.adapted, adapter_layers_of(model), strict=True)
              if layer.merged for local in layer.tied]
    _restore(model, state.adapted, state.requires_grad_before, originals=originals)
    if untied:
        settle_config(model, untied)
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
