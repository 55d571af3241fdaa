"""`AdapterLayer`: the wrapper every module method subclasses; bookkeeping written once.

A method writes

* `adapt(x, y)`: the adapted output given the input `x` and the base output `y = base(x)`;
  or `adapted_forward(x)` when it must change what the base sees (input scaling);
* `delta_weight()` when its update is additive in weight space (`W' = W + delta`), or
  `merged_weight(W)` / `unmerged_weight(W')` when the fold is not additive (DoRA, (IA)^3);
* `reset_parameters()`: the method's initialisation (not run when weights are loaded from a file);
* optionally `after_load()` and `restore_base()` when its init changes the base weight (PiSSA), and then
  `rewrites_base = True`, so `apply` keeps a copy to roll back to and unties a shared base first.

Merging is all or nothing and `unmerge` is exact where that is cheap: `merge` copies the base's tensors
before writing them (kept only while the merge runs unless `keep_base=True`), so a failed merge puts
back the very bits it found; a base tensor shared with another module (tied weights) is swapped for a
private copy before the write, and unmerging swaps the untouched shared tensor back (bit-exact, free).
Otherwise `unmerge` subtracts the update again (see `unmerge` for how exact that is).

The base layer keeps its own state-dict keys: the wrapper's `base.` prefix is stripped on save and
restored on load, so `model.state_dict()` of an adapted model still reads like the original model's.

Named adapters stack: a second adapter on the same module wraps the first layer (`base` is then an
AdapterLayer; `weights.plain` finds the user's module under the chain, and attributes the wrapper lacks
are read from it). `is_active` is the adapter's switch (`set_active`), `enabled` the model-wide one
(`disabled`), and `router` routes the samples of a mixed-adapter batch (`core.routing`): a layer then
runs its update on its own samples only.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import weights
from .routing import PerSample
from .snapshot import TensorSnapshot


class MergeError(RuntimeError):
    """Merging would corrupt the base weights (non-finite values) or is not supported."""


class AdapterLayer(PerSample, nn.Module):
    """Wraps one base module; enable/disable/merge/unmerge live here and nowhere else."""

    mergeable: bool = True
    """False for methods whose effect cannot be folded into base weights (prompt tuning)."""

    rewrites_base: bool = False
    """True when `reset_parameters` or `after_load` write into the base's tensors (PiSSA's residual): `apply`
    then copies the base first, to roll a failed apply back bit for bit, and unties a shared base weight."""

    wraps_base: bool = True
    """Marks adapter layers for `weights.plain` (which core/weights.py cannot import)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.merged = False
        self.enabled = True
        self.is_active = True
        """Off while its named adapter is not among the active ones (`set_active`)."""
        self.adapter_name = "default"
        self.router = None
        """The model's `routing.Router` (set by `apply`), consulted only during a mixed-adapter call."""
        self.added_bias = False
        """Set while merged when merging created the base's bias (`merged_bias(None)` gave a tensor)."""
        self.tied: dict[str, nn.Parameter] = {}
        """Base parameters shared with other modules that `untie` swapped for private copies, by local name."""
        self._base_copy: TensorSnapshot | None = None
        """The base as it was before `merge`, while merged with `keep_base` (or when `needs_base_copy`)."""
        self._register_state_dict_hook(_strip_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    # --- what a method provides -------------------------------------------------------------
    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adapted output from input `x` and base output `y`."""
        raise NotImplementedError

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The active forward; override only when the base must see a changed input."""
        return self.adapt(x, self.base(x, *args, **kwargs))

    def delta_weight(self) -> torch.Tensor:
        """Additive weight update in the canonical `(d_out, d_in, ...)` layout."""
        raise MergeError(f"{type(self).__name__} cannot be merged into its base weights")

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Base weight with the adapter folded in; additive by default."""
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `merged_weight`."""
        return weight - self.delta_weight().to(weight.dtype)

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """Base bias with the adapter folded in (unchanged by default). `bias` is None when the base has none:
        return None to leave it so, or a tensor when the update shifts the output (LoFiT's W_o v): merging then
        gives the base a bias (`weights.set_bias`), and unmerging removes it again."""
        return bias

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """Inverse of `merged_bias`."""
        return bias

    def reset_parameters(self) -> None:
        """Initialise the adapter's parameters (skipped when loading saved weights)."""

    def after_load(self) -> None:
        """Called after saved adapter weights were loaded (re-derive anything the init derived)."""

    def restore_base(self) -> None:
        """Undo any change the init made to the base weight (called before unloading unmerged)."""

    # --- written once -----------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The original module's output while disabled; override when the init changed the base."""
        return self.base(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged:
            return self.base(x, *args, **kwargs)
        if self.router is not None and self.router.routing and self.enabled and not self.routes_itself:
            return self.routed_forward(x, *args, **kwargs)
        if self.routes_itself and self.routing():
            return self.adapted_forward(x, *args, **kwargs) if self.enabled else self.base_forward(x, *args, **kwargs)
        if not (self.enabled and self.is_active):
            return self.base_forward(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def stacked(self) -> bool:
        """True when this layer wraps another adapter's layer: a fused kernel reading the base weight would skip it."""
        return isinstance(self.base, AdapterLayer)

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks come from the user's module (`in_features` ...); never from an adapter
        layer it wraps (two stacked layers of one method each keep their own buffers)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__["_modules"].get("base")
            if base is None or name.startswith("_"):
                raise
            return getattr(weights.plain(base), name)

    @property
    def plain_base(self) -> nn.Module:
        """The user's module under this layer and any adapter layers it wraps."""
        return weights.plain(self.base)

    def adapter_keys(self) -> set[str]:
        """State-dict keys of this layer's own tensors and of the adapter layers it wraps, relative to it."""
        own = {n for n, _ in self.named_parameters() if not n.startswith("base.")}
        own |= {n for n, _ in _persistent_buffers(self) if not n.startswith("base.")}
        inner = self._modules["base"]
        if isinstance(inner, AdapterLayer):
            own |= {"base." + k for k in inner.adapter_keys()}
        return own

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's own parameters and persistent buffers (not the base's, not a wrapped adapter's)."""
        out = {n: p for n, p in self.named_parameters() if not n.startswith("base.")}
        out |= {n: b for n, b in _persistent_buffers(self) if not n.startswith("base.")}
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight Parameter, so code that reads `module.weight` keeps working."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias Parameter (or None)."""
        return getattr(self.base, "bias", None)

    def needs_base_copy(self) -> bool:
        """True when `unmerged_weight` could not recover the base from the merged one (DoRA with a zero
        magnitude): `merge` then keeps a copy of the base to unmerge from."""
        return False

    @torch.no_grad()
    def merge(self, safe: bool = True, keep_base: bool = False, untie: tuple[str, ...] | list[str] = ()) -> None:
        """Fold the adapter into the base weights; all or nothing.

        Args:
            safe: refuse non-finite results (checked before anything is written).
            keep_base: keep a CPU copy of the base's tensors so `unmerge` restores them bit for bit
                (memory: one copy of the base weight; otherwise unmerge subtracts the update again).
            untie: base parameter names shared with other modules (`core.tying`): merged into a private
                copy, so the other modules keep their weights.
        """
        if self.merged:
            return
        new_weight, new_bias, adds_bias = self._merged_tensors(safe)
        copy = TensorSnapshot(self.plain_base, skip_values=tuple(untie))
        try:
            self.untie(untie)
            weights.set_weight(self.base, new_weight)
            if new_bias is not None:
                weights.set_bias(self.base, new_bias)
        except BaseException:
            copy.restore()
            self.tied.clear()
            raise
        self.merged, self.added_bias = True, adds_bias
        self._base_copy = copy if keep_base or self.needs_base_copy() else None

    def _merged_tensors(self, safe: bool) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(merged weight, merged bias or None, whether the bias is new), computed without writing anything."""
        weight = weights.get_weight(self.base)
        new_weight = self.merged_weight(weight.float())
        bias = weights.get_bias(self.base)
        new_bias = self.merged_bias(None if bias is None else bias.float())
        adds_bias = bias is None and new_bias is not None
        if adds_bias and not weights.can_add_bias(self.base):
            raise MergeError(f"{type(self).__name__} folds into a bias, and {type(self.base).__name__} has none "
                             "that peftkit can add; use the adapter unmerged")
        finite = bool(torch.isfinite(new_weight).all()) and (new_bias is None or bool(torch.isfinite(new_bias).all()))
        if safe and not finite:
            raise MergeError(f"merging {type(self).__name__} gives non-finite weights; base left unchanged")
        return new_weight, new_bias, adds_bias

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter out of the base weights again.

        Bit-exact when the base was copied at merge (`keep_base=True`, or `needs_base_copy`) and for tied
        weights (the shared tensor was never written). Otherwise the update is subtracted again, exact up to
        rounding: the merged weight was rounded to the base dtype, so W + delta - delta can differ from W by
        about one unit in the last place of the base dtype (float32: ~1e-7 relative, in few elements;
        bfloat16: 2^-8 relative, in a share of the elements), and repeated merge/unmerge cycles can add up.
        """
        if not self.merged:
            return
        if self._base_copy is not None:
            self._base_copy.restore()
            self._base_copy = None
            self.tied.clear()
        else:
            self._subtract_update()
        self.merged, self.added_bias = False, False

    def _subtract_update(self) -> None:
        if "weight" not in self.tied:
            weights.set_weight(self.base, self.unmerged_weight(weights.get_weight(self.base).float()))
        bias = weights.get_bias(self.base)
        if self.added_bias:
            weights.remove_bias(self.base)
        elif bias is not None and "bias" not in self.tied:
            weights.set_bias(self.base, self.unmerged_bias(bias.float()))
        self.retie()

    def untie(self, names: tuple[str, ...] | list[str]) -> None:
        """Swap the named base parameters (shared with other modules) for private copies, remembering the
        shared ones in `tied`; nothing is written into the shared tensors afterwards."""
        for name in names:
            if name in self.tied:
                continue
            shared = self.plain_base._parameters[name]
            self.tied[name] = shared
            self.plain_base._parameters[name] = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)

    def retie(self) -> None:
        """Put the shared parameters `untie` swapped out back (their values were never written)."""
        for name, shared in self.tied.items():
            self.plain_base._parameters[name] = shared
        self.tied.clear()

    def forget_base(self) -> None:
        """Drop the copy `merge(keep_base=True)` kept (unmerge then subtracts the update), unless
        `needs_base_copy` says the update cannot be subtracted."""
        if not (self.merged and self.needs_base_copy()):
            self._base_copy = None

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters (not the base's), by local name."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}


def _persistent_buffers(module: nn.Module):
    for name, buffer in module.named_buffers():
        owner, _, local = name.rpartition(".")
        if local not in module.get_submodule(owner)._non_persistent_buffers_set:
            yield name, buffer


def _strip_base_prefix(module, state_dict, prefix, local_metadata) -> None:
    """The user's module keeps its keys: `<prefix>base.weight` -> `<prefix>weight` (keys of stacked adapter
    layers under `base` keep theirs: which keys those are is known by type, not guessed from names)."""
    inner = module._modules["base"]
    stacked = inner.adapter_keys() if isinstance(inner, AdapterLayer) else set()
    for key in [k for k in state_dict if k.startswith(prefix + "base.")]:
        tail = key[len(prefix) + 5 :]
        if tail not in stacked:
            state_dict[prefix + tail] = state_dict.pop(key)


def _add_base_prefix(module, state_dict, prefix, *args) -> None:
    """The inverse of `_strip_base_prefix`: a key of the user's module goes to it under the whole chain."""
    own = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    depth, inner = 1, module._modules["base"]
    while isinstance(inner, AdapterLayer):
        depth, inner = depth + 1, inner._modules["base"]
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix) :]
        if local not in own and "base." * depth + local in own:
            state_dict[prefix + "base." * depth + local] = state_dict.pop(key)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every AdapterLayer in the model by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
