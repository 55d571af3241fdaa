"""`ModelAdapter`: the part of one named adapter that acts on the whole model, not inside one module.

An `AdapterLayer` wraps one base module and sees only it. Some methods also need the model: a soft
prompt rewrites the model's call, prefix tuning fills the backbone's KV cache, VQT replaces the head's
logits, LLaMA-Adapter hooks the projections inside the attention it wraps, RandLoRA draws one set of random
bases for all its layers, (IA)^3 and LoFiT read roles and head counts from the model, DePT trains two
groups of parameters at two learning rates. Such a method registers a ModelAdapter next to its builder:

    @register_model_adapter(PrefixTuningConfig)
    class PrefixHooks(ModelAdapter):
        def attach(self, model, layers): ...      # layers: this adapter's AdapterLayers by module name

`apply` makes one per named adapter, attaches it once after that adapter's layers are in place (so it
sees them all), keeps it in the adapter's state, and detaches it once before the layers go (`unload`,
`delete`, and a failed `apply`, also when `attach` itself failed half way). Hooks registered through
`self.hook(...)` are removed by the default `detach`; a subclass that installs anything else undoes it
in its own `detach`. The adapter's parameters stay on its layers, so adapter files name them there.
"""

from __future__ import annotations

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .config import AdapterConfig
from .layer import AdapterLayer


class ModelAdapter:
    """Whole-model part of one adapter: attached once after its layers, detached once before they go."""

    def __init__(self, cfg: AdapterConfig) -> None:
        self.cfg = cfg
        self.layers: dict[str, AdapterLayer] = {}
        self._handles: list[RemovableHandle] = []

    def attach(self, model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
        """Install what the method needs on `model` and finish what needed the model; raise ConfigError when
        the model cannot take the adapter (it is then detached and the whole `apply` rolled back)."""
        self.layers = layers

    def detach(self, model: nn.Module) -> None:
        """Remove everything `attach` installed; must work after a partial `attach` and be idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def learning_rates(self, base_lr: float) -> dict[nn.Parameter, float]:
        """Parameters that train at another learning rate than the run's `base_lr` (DePT's two); the rest
        train at `base_lr`. `core.params.param_groups` turns them into optimizer parameter groups."""
        return {}

    def hook(self, handle: RemovableHandle) -> RemovableHandle:
        """Keep a hook handle (`module.register_forward_hook(...)`) for `detach` to remove."""
        self._handles.append(handle)
        return handle

    def only_layer(self) -> AdapterLayer:
        """The adapter's single layer (soft prompts and prefixes sit on the input embedding only)."""
        if len(self.layers) != 1:
            raise RuntimeError(f"{type(self).__name__} expects one layer, found {len(self.layers)}")
        return next(iter(self.layers.values()))
