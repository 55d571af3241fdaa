"""Method registry: a decorator per method, no central list to edit.

Two kinds of method exist:

* module methods wrap matched modules: `@register(LoRAConfig)` on
  `build(module, cfg, name) -> AdapterLayer | None` (None: this module is not supported);
* selection methods add no modules and only choose which existing parameters train:
  `@register_selection(HeadOnlyConfig)` on `select(model, cfg) -> list[str]` (parameter names).

A module method whose layers also need the whole model (hooks on the root, tensors shared by its layers,
roles read from the model) registers a `core.model_adapter.ModelAdapter` for the same config class with
`@register_model_adapter(Config)`.

A method may be both (DiffFit wraps the residual branches' last linear layers and trains every bias
and norm): it registers a builder and a selector for the same config class. `apply` runs the
selector after wrapping, so it sees the adapted model (`...o_proj.base.bias`); the selected
parameters are then handled as for any selection method (originals kept for `disabled` and restored
by an unmerged `unload`, saved in the adapter file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .config import AdapterConfig, ConfigError


@dataclass(frozen=True)
class Method:
    """One registered method: its config class, a module builder, a parameter selector, or both."""

    name: str
    config_cls: type[AdapterConfig]
    build: Callable[[nn.Module, Any, str], nn.Module | None] | None = None
    select: Callable[[nn.Module, Any], list[str]] | None = None
    calibrate: Callable[[nn.Module, Any, Any], AdapterConfig] | None = None
    model_adapter: Callable[[Any], Any] | None = None
    """Makes the adapter's whole-model part (`core.model_adapter.ModelAdapter`) from its config."""


_METHODS: dict[str, Method] = {}


def _add(method: Method) -> None:
    if not method.name:
        raise TypeError(f"{method.config_cls.__name__} must set the class variable `method`")
    existing = _METHODS.get(method.name)
    if existing is not None and existing.config_cls is not method.config_cls:
        raise TypeError(f"method name {method.name!r} is already registered by {existing.config_cls}")
    if existing is not None:  # a builder, selector, calibration for one config: keep all (re-imports replace)
        method = Method(method.name, method.config_cls, build=method.build or existing.build,
                        select=method.select or existing.select,
                        calibrate=method.calibrate or existing.calibrate,
                        model_adapter=method.model_adapter or existing.model_adapter)
    _METHODS[method.name] = method


def register(config_cls: type[AdapterConfig]) -> Callable:
    """Register `build(module, cfg, name)` as the module builder of `config_cls.method`."""

    def decorator(build: Callable) -> Callable:
        _add(Method(config_cls.method, config_cls, build=build))
        return build

    return decorator


def register_selection(config_cls: type[AdapterConfig]) -> Callable:
    """Register `select(model, cfg) -> parameter names` for a method that adds no modules."""

    def decorator(select: Callable) -> Callable:
        _add(Method(config_cls.method, config_cls, select=select))
        return select

    return decorator


def register_model_adapter(config_cls: type[AdapterConfig]) -> Callable:
    """Register a `ModelAdapter` subclass (or any `make(cfg) -> ModelAdapter`) as the whole-model part of
    `config_cls.method`: `apply` attaches one per named adapter after building its layers."""

    def decorator(make: Callable) -> Callable:
        _add(Method(config_cls.method, config_cls, model_adapter=make))
        return make

    return decorator


def register_calibration(config_cls: type[AdapterConfig]) -> Callable:
    """Register `calibrate(model, cfg, batches) -> cfg`: the data-dependent step that finishes a config."""

    def decorator(calibrate: Callable) -> Callable:
        _add(Method(config_cls.method, config_cls, calibrate=calibrate))
        return calibrate

    return decorator


def get_method(name_or_config: str | AdapterConfig) -> Method:
    """The registered method for a name or a config instance."""
    name = name_or_config if isinstance(name_or_config, str) else getattr(name_or_config, "method", name_or_config)
    if not isinstance(name, str) or name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def registered_methods() -> dict[str, Method]:
    """All registered methods by name, sorted."""
    return dict(sorted(_METHODS.items()))


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild any method's config from its `to_dict()` (the "method" key selects the class)."""
    if not isinstance(data, dict):
        raise ConfigError(f"an adapter config must be a mapping with a 'method' key, got {type(data).__name__} "
                          f"{data!r:.80}")
    if "method" not in data:
        raise ConfigError(f"config has no 'method' key; registered methods: {', '.join(sorted(_METHODS))}")
    return get_method(data["method"]).config_cls.from_dict(data)
