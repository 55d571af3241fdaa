"""merge / unmerge / disabled: folding named adapters into the base weights, and running the base alone.

With several adapters on one module (stacked: each layer wraps the last), folding must keep what the
stack computes. An additive update (W + delta) may be merged unless a merged non-additive layer (DoRA,
(IA)^3) sits above it (it would scale delta too) or an unmerged one below it (it would miss delta). A
non-additive layer scales everything under it: it is merged only when every layer below is merged and
none above is. Unmerging refuses when a merged non-additive layer (for a non-additive one: any merged
layer) sits above.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from .adapters import AdapterState, adapter_set, get_state, plain_parameters, set_active
from .config import ConfigError
from .inject import get_module
from .layer import AdapterLayer, MergeError
from .tying import SharedTensors, warn_untied


def _adapters_named(model: nn.Module, name: str | None, merged: bool) -> list[AdapterState]:
    found = adapter_set(model)
    if found is None:
        get_state(model)  # raises the usual error
    if name is not None:
        return [get_state(model, name)]
    return [s for n, s in found.states.items() if (s.merged if merged else n in found.active)]


def merge(model: nn.Module, name: str | None = None, safe: bool = True, keep_base: bool = False) -> nn.Module:
    """Fold adapter `name` (without a name: every active adapter) into the base weights (outputs unchanged,
    no extra latency).

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
    states = _adapters_named(model, name, merged=False)
    found = adapter_set(model)
    inactive = [s.name for s in states if s.name not in found.active]
    if inactive:  # a merged adapter acts on every input: it becomes active (its in-place values come back)
        set_active(model, [n for n in found.states if n in found.active or n in inactive])
    pairs = [(module, layer) for s in states for module, layer in s.layers.items()]
    blocked = sorted({type(layer).__name__ for _, layer in pairs if not layer.mergeable})
    if blocked:
        raise MergeError(f"{', '.join(blocked)} cannot be merged (not a weight-space method); use it unmerged")
    shared = SharedTensors(model)
    merged: list[AdapterLayer] = []
    untied: list[tuple[str, dict[str, list[str]]]] = []
    try:
        for module, layer in pairs:
            if layer.merged:
                continue
            _check_stack(model, module, layer, "merge")
            ties = shared.outside(layer.plain_base, layer)
            layer.merge(safe=safe, keep_base=True, untie=list(ties))
            merged.append(layer)
            if ties:
                untied.append((module, ties))
    except BaseException:
        for layer in reversed(merged):
            layer.unmerge()  # restores the copy: bit-exact
        raise
    if not keep_base:
        for layer in merged:
            layer.forget_base()
    _mark_merged(model, states)
    for module, ties in untied:
        warn_untied(module, ties, "merging writes the update into the weight")
    return model


def _mark_merged(model: nn.Module, states: list[AdapterState]) -> None:
    for state in states:
        state.merged = True


def unmerge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Undo `merge` of adapter `name` (without a name: of every merged adapter); bit-exact with
    `merge(keep_base=True)` and for tied weights (see `AdapterLayer.unmerge`)."""
    for state in reversed(_adapters_named(model, name, merged=True)):
        for module, layer in reversed(list(state.layers.items())):
            if layer.merged:
                _check_stack(model, module, layer, "unmerge")
                layer.unmerge()
        state.merged = False
    return model


def _additive(layer: AdapterLayer) -> bool:
    return type(layer).merged_weight is AdapterLayer.merged_weight and \
        type(layer).unmerged_weight is AdapterLayer.unmerged_weight


def _check_stack(model: nn.Module, module: str, layer: AdapterLayer, what: str) -> None:
    """Refuse a merge/unmerge that would change what the stack of adapters on `module` computes."""
    chain, node = [], get_module(model, module)
    while isinstance(node, AdapterLayer):
        chain.append(node)
        node = node.base
    if len(chain) < 2:
        return
    above = chain[: chain.index(layer)]
    below = chain[chain.index(layer) + 1 :]
    if _additive(layer):  # W + delta commutes with additive layers; a merged scaling above would scale delta too,
        clash = [m for m in above if m.merged and not _additive(m)]  # an unmerged one below would miss it
        clash += [m for m in below if not m.merged and not _additive(m)] if what == "merge" else []
    else:  # it scales what lies under it: everything below must be in W, nothing above may be
        clash = [m for m in above if m.merged] + ([m for m in below if not m.merged] if what == "merge" else [])
    if clash:
        raise MergeError(f"cannot {what} adapter {layer.adapter_name!r} ({type(layer).__name__}) on {module}: adapter(s) "
                         f"{sorted({m.adapter_name for m in clash})} stacked on the same module would then compute "
                         "something else (its update is not additive, or one above it scales the weight); "
                         f"{'unmerge' if what == 'merge' else 'unmerge first'} or deactivate those first")


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model exactly, inside the block, then re-enable the adapters."""
    found = adapter_set(model)
    if found is None:
        get_state(model)
    states = list(found.states.values())
    for state in states:
        if state.selected and not state.originals:
            raise ConfigError(f"{state.config.method} trains base weights in place; there is no base model to return to")
        if state.merged:
            raise MergeError(f"adapter {state.name!r} is merged; call peftkit.unmerge(model) before disabling it")
    layers = [layer for s in states for layer in s.layers.values()]
    params = plain_parameters(model)
    live = {n: o for s in states if not s.stash for n, o in s.originals.items()}  # inactive ones hold originals
    trained = {n: params[n].detach().clone() for n in live}
    try:
        for layer in layers:
            layer.enabled = False
        with torch.no_grad():
            for n, original in live.items():
                params[n].copy_(original)
        yield model
    finally:
        for layer in layers:
            layer.enabled = True
        with torch.no_grad():
            for n, value in trained.items():
                params[n].copy_(value)
