"""Mixed-adapter batches: which named adapter (or mixture of adapters) each sample of one call runs with.

    model(**batch, adapter_names=["fr", "de", "__base__", "fr"])            # one adapter per sample
    model(**batch, adapter_names=[("lq", "hq")] * 4, adapter_weights=[(0.7, 0.3)] * 4)   # mixtures
    model.generate(**inputs, adapter_names=[...])                           # the same while generating

For one call, sample i runs with the adapters named in entry i, each layer's update scaled by its
weight (1 by default), whatever `set_active` says; "__base__" (or an empty entry) is the base model.
For an adapter layer computing y = f(x) from the base output y0 = W0 x, a sample with weight w gets

    y_i = y0_i + w (f(x_i) - y0_i)        (for LoRA: W0 x_i + w B A x_i; PETALface mixes two this way)

and adapters stacked on one module (each wraps the last) compose in the order they were applied.

A `Router` is shared by every adapter layer of a model. A forward pre-hook on the model takes the two
keyword arguments out of the call (the model itself never sees them) and a forward hook clears them,
even when the call fails. `generate` is wrapped on the model instance for the same purpose (transformers
refuses keyword arguments the model's forward does not name). Beam search and `num_return_sequences`
repeat each sample k times in a row: a batch k times as long as the list repeats each entry k times.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from .config import ConfigError

BASE = "__base__"
"""The name that runs a sample on the base model alone."""

ROUTER_ATTR = "peftkit_router"


class Router:
    """The per-sample adapter choice of the call in progress (None outside a mixed-batch call)."""

    def __init__(self, known: Sequence[str] = ()) -> None:
        self.known = set(known)
        self.entries: list[tuple[tuple[str, float], ...]] | None = None
        self.sticky = False
        self.scratch: dict = {}
        """Per forward call: what layers that route themselves tell each other (prompt columns placed so far)."""
        self.handles: list = []
        self._subsets: list[tuple[list[int], int]] = []
        self._rows: dict[tuple, tuple[torch.Tensor, torch.Tensor | None] | None] = {}

    @property
    def routing(self) -> bool:
        return self.entries is not None

    def set(self, names: Sequence, weights: Sequence | None = None) -> None:
        """Check and store one call's `adapter_names` (+ `adapter_weights`)."""
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ConfigError("adapter_names must be a list with one entry per sample (a name, or a list of names "
                              f"to mix), e.g. ['fr', 'de', '{BASE}']; got {names!r:.80}")
        if weights is not None and len(weights) != len(names):
            raise ConfigError(f"adapter_weights has {len(weights)} entries for {len(names)} samples in adapter_names")
        entries = []
        for i, entry in enumerate(names):
            group = (entry,) if isinstance(entry, str) else tuple(entry)
            scale = _weights_of(weights, i, len(group))
            unknown = [n for n in group if n != BASE and n not in self.known]
            if unknown:
                raise ConfigError(f"adapter_names[{i}] names {unknown}, which this model does not have; its adapters: "
                                  f"{sorted(self.known)} (and '{BASE}' for the base model)")
            entries.append(tuple((n, w) for n, w in zip(group, scale, strict=True) if n != BASE))
        self.entries, self._rows, self._subsets = entries, {}, []

    def clear(self) -> None:
        self.entries, self._rows, self._subsets = None, {}, []

    def rows(self, adapter: str, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(indices of the samples that use `adapter`, their weights or None when all are 1), or None if none do."""
        key = (adapter, batch, device, tuple(self._subsets[-1][0]) if self._subsets else None)
        if key not in self._rows:
            self._rows[key] = self._find_rows(adapter, self._entries_for(batch), device)
        return self._rows[key]

    @contextlib.contextmanager
    def narrowed(self, index: torch.Tensor, batch: int) -> Iterator[None]:
        """Inside, the model's layers see only rows `index` of the current batch (a layer running its base on
        its own samples: the adapters stacked under it must route those samples, not the whole batch)."""
        rows = index.tolist()
        outer, full = self._subsets[-1] if self._subsets else (list(range(batch)), batch)
        self._subsets.append(([outer[i] for i in rows], full))
        try:
            yield
        finally:
            self._subsets.pop()

    def _entries_for(self, batch: int) -> list[tuple[tuple[str, float], ...]]:
        """The entry of each row of a batch of `batch` rows the current layer sees."""
        if self._subsets:
            rows, full = self._subsets[-1]
            if batch == len(rows):
                return [self._expanded(full)[i] for i in rows]
        return self._expanded(batch)

    def _expanded(self, batch: int) -> list[tuple[tuple[str, float], ...]]:
        n = len(self.entries)
        if batch % n:
            raise ConfigError(f"adapter_names has {n} entries but a layer of the model sees a batch of {batch} "
                              "(one entry per sample is needed; a module that does not keep the batch first, or "
                              "a flattened batch, cannot be routed per sample)")
        return [entry for entry in self.entries for _ in range(batch // n)]

    @staticmethod
    def _find_rows(adapter: str, entries: list, device: torch.device):
        hits = [(row, w) for row, entry in enumerate(entries) for name, w in entry if name == adapter]
        if not hits:
            return None
        index = torch.tensor([i for i, _ in hits], device=device)
        scales = [w for _, w in hits]
        weights = None if all(w == 1.0 for w in scales) else torch.tensor(scales, device=device)
        return index, weights


def _weights_of(weights, i: int, size: int) -> list[float]:
    if weights is None:
        return [1.0] * size
    entry = weights[i]
    entry = entry.tolist() if isinstance(entry, torch.Tensor) else entry
    scale = [entry] if isinstance(entry, int | float) else list(entry)
    if len(scale) != size or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in scale):
        raise ConfigError(f"adapter_weights[{i}] must hold {size} number(s), one per name in adapter_names[{i}]; "
                          f"got {entry!r:.60}")
    return [float(w) for w in scale]


def router_of(model: nn.Module) -> Router | None:
    return getattr(model, ROUTER_ATTR, None)


def install(model: nn.Module, names: Sequence[str]) -> Router:
    """Give the model its router (once) and the hooks that feed it; `names` are the model's adapters."""
    router = router_of(model)
    if router is None:
        router = Router(names)
        setattr(model, ROUTER_ATTR, router)
        router.handles = [model.register_forward_pre_hook(functools.partial(_take_arguments, router), with_kwargs=True),
                          model.register_forward_hook(functools.partial(_clear, router), always_call=True)]
        if callable(getattr(model, "generate", None)):
            model.generate = functools.partial(_generate, router, model.generate)
    router.known = set(names)
    return router


def uninstall(model: nn.Module) -> None:
    """Remove the router, its hooks and the generate wrapper (when the last adapter goes)."""
    router = router_of(model)
    if router is None:
        return
    for handle in router.handles:
        handle.remove()
    if isinstance(model.__dict__.get("generate"), functools.partial):
        del model.__dict__["generate"]
    delattr(model, ROUTER_ATTR)


def _take_arguments(router: Router, module, args, kwargs):
    router.scratch = {}
    if "adapter_names" not in kwargs:
        if "adapter_weights" in kwargs:
            raise ConfigError("adapter_weights needs adapter_names (one entry per sample)")
        return None
    names, weights = kwargs.pop("adapter_names"), kwargs.pop("adapter_weights", None)
    if names is not None:
        check_routable(module)
        router.set(names, weights)
        check_layers(module, router)
    return args, kwargs


def check_layers(model: nn.Module, router: Router) -> None:
    """Refuse, before any compute, a mixed call naming an adapter with a layer that cannot route samples."""
    from .adapters import adapter_set

    named = {name for entry in router.entries for name, _ in entry}
    for name in named:
        for layer in adapter_set(model).states[name].layers.values():
            problem = layer.mixed_batch_problem(model)
            if problem:
                router.clear()
                raise ConfigError(problem)


def check_routable(model: nn.Module) -> None:
    """Refuse a mixed batch while an adapter acts on every sample through the base weights themselves."""
    from .adapters import adapter_set

    found = adapter_set(model)
    for name, state in found.states.items() if found else ():
        if state.merged:
            raise ConfigError(f"adapter {name!r} is merged into the base weights, so it would act on every sample of a "
                              f"mixed-adapter batch; call peftkit.unmerge(model, {name!r}) first")
        if state.selected and not state.stash:
            raise ConfigError(f"adapter {name!r} ({state.config.method}) trains base parameters in place, so it cannot "
                              "act on some samples of a batch only (mixed-adapter batches, adapter_names=); "
                              f"deactivate it (peftkit.set_active) or run its samples in a batch of their own")


def _clear(router: Router, module, args, output):
    if not getattr(router, "sticky", False):
        router.clear()


def _generate(router: Router, generate, *args, adapter_names=None, adapter_weights=None, **kwargs):
    if adapter_names is None:
        return generate(*args, **kwargs)
    check_routable(generate.__self__)
    with routed_router(router, adapter_names, adapter_weights):
        check_layers(generate.__self__, router)
        return generate(*args, **kwargs)


@contextlib.contextmanager
def routed_router(router: Router, names: Sequence, weights: Sequence | None = None) -> Iterator[Router]:
    router.set(names, weights)
    router.sticky = True
    try:
        yield router
    finally:
        router.sticky = False
        router.clear()


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence, adapter_weights: Sequence | None = None):
    """Every forward inside the block routes sample i to `adapter_names[i]` (for loops that call the model
    through code that cannot pass the keyword arguments, e.g. a pipeline)."""
    router = router_of(model)
    if router is None:
        raise ConfigError("this model has no peftkit adapter; call peftkit.apply(model, config) first")
    check_routable(model)
    with routed_router(router, adapter_names, adapter_weights):
        check_layers(model, router)
        yield model


class PerSample:
    """What an adapter layer does in a mixed-adapter call (a base of `AdapterLayer`; its attributes `router`,
    `adapter_name`, `per_sample` ... are set there)."""

    per_sample: bool = True
    """False for methods whose update cannot act on some samples of a batch only (see `core.routing`)."""

    routes_itself: bool = False
    """True for methods that act through hooks elsewhere in the model (soft prompts, LLaMA-Adapter's attention,
    VQT's head): in a mixed-adapter call they run as usual and weigh their effect per sample themselves
    (`sample_weights`); the default runs the update on the layer's own samples only (`routed_forward`)."""

    def routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """A mixed-adapter batch: y = base(x) for every sample, then y_i += w_i (f(x_i) - y_i) for the samples
        that name this adapter (f = this layer's adapted forward), computed on those samples only."""
        if not self.per_sample:
            raise ConfigError(self.mixed_batch_problem(None))
        y = self.base_forward(x, *args, **kwargs)
        rows = self.router.rows(self.adapter_name, x.shape[0], x.device)
        if rows is None:
            return y
        index, scale = rows
        ours = y.index_select(0, index)
        if self.routes_by_adapt():
            new = self.adapt(x.index_select(0, index), ours.clone() if scale is not None else ours)
        else:  # the base must see a changed input, or the init changed the base: run both on these samples
            with self.router.narrowed(index, x.shape[0]):
                new = self.adapted_forward(x.index_select(0, index), *args, **kwargs)
        if scale is not None:
            new = ours + scale.to(new.dtype).view(-1, *[1] * (new.dim() - 1)) * (new - ours)
        if y._base is None and y.data_ptr() != x.data_ptr() and not torch.is_grad_enabled():
            return y.index_copy_(0, index, new.to(y.dtype))  # inference: no copy of the whole output
        return y.index_copy(0, index, new.to(y.dtype))

    def mixed_batch_problem(self, root: nn.Module) -> str | None:
        """Why this layer cannot take part in a mixed-adapter call on `root` (None when it can)."""
        if self.per_sample:
            return None
        return (f"{type(self).__name__} (adapter {self.adapter_name!r}) cannot run on some samples of a batch only, "
                "so it does not support mixed-adapter batches (adapter_names=); run its samples in a batch of "
                "their own with peftkit.set_active")

    def routes_by_adapt(self) -> bool:
        """True when `adapted_forward(x)` is `adapt(x, base(x))` and `base_forward` is the base (a fused kernel
        may compute the same): a mixed-adapter call then reuses the base output and runs `adapt` on the
        layer's own samples; otherwise it runs `adapted_forward` on them."""
        from .layer import AdapterLayer  # the defaults are AdapterLayer's (which imports this module)

        return type(self).adapted_forward is AdapterLayer.adapted_forward and \
            type(self).base_forward is AdapterLayer.base_forward

    def routing(self) -> bool:
        """True during a mixed-adapter call (`core.routing`)."""
        return self.router is not None and self.router.routing

    def sample_weights(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """This adapter's weight for each of `batch` samples (0 where a sample does not name it) during a
        mixed-adapter call; None otherwise (then the adapter acts on every sample while active)."""
        if not self.routing():
            return None
        rows = self.router.rows(self.adapter_name, batch, device)
        out = torch.zeros(batch, device=device)
        if rows is not None:
            out[rows[0]] = 1.0 if rows[1] is None else rows[1]
        return out
