"""What every Hugging Face peft converter shares: the `PeftConverter` base, its registry, and the helpers the
converters in `peftkit/methods/peft/` use to write and read peft's adapter_config.json fields.

A peft type takes part with one module in `peftkit/methods/peft/` that subclasses `PeftConverter` and
registers an instance (`register_peft`); `peft_format.py` (the file layout, keys, validation, reading and
writing) finds it by config class (`peft_converter`) or by the file's peft_type (`converter_for_peft`).
Nothing here knows a method.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .apply import get_state
from .config import AdapterConfig, ConfigError
from .inject import matches
from .io import _few, base_model_name
from .layer import AdapterLayer

TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}
"""Model class name suffix -> peft task type (only unambiguous ones)."""

TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
"""Modules peft adds to modules_to_save by itself for a task type (and then never adapts)."""

ANY_VALUE = ("peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
             "inference_mode", "task_type")
"""Fields of every peft config that do not change the adapter's function."""


# --- converters: one per method that Hugging Face peft also has -------------------------------
class PeftConverter:
    """How one method's adapters map to one Hugging Face peft type (subclassed in `methods/peft/`).

    A converter states the peft type (and `variant`: adapter_config.json values that pick it among
    converters of the same type, DoRA's `{"use_dora": True}`), the config class it maps, the config
    both ways (`to_peft`, `from_peft`) and the layers' tensors: `tensors` (local name -> peft name),
    `key` (the full key in the file), `export` (peft's form of the values) and `recreated` (tensors a
    peft file may hold that peftkit re-creates instead of loading). The defaults suit a method whose
    tensors peft stores under the module path, as they are.
    """

    peft_type: ClassVar[str] = ""
    variant: ClassVar[dict[str, Any]] = {}
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    tensors: ClassVar[dict[str, str]] = {}

    def to_peft(self, cfg: AdapterConfig, model: nn.Module) -> dict[str, Any]:
        """peft's adapter_config.json fields for the adapter `cfg` on `model`."""
        raise NotImplementedError

    def from_peft(self, data: dict[str, Any], model: nn.Module | None = None) -> AdapterConfig:
        """The peftkit config of a peft adapter_config.json dict."""
        raise NotImplementedError

    def names(self, layer: AdapterLayer) -> dict[str, str]:
        """Local tensor name -> peft tensor name, for one adapted layer."""
        return self.tensors

    def key(self, layer: AdapterLayer, module_name: str, local: str) -> str:
        """The full key of one of the layer's tensors in a peft adapter file."""
        return f"base_model.model.{module_name}.{self.names(layer)[local]}"

    def export(self, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        """The layer's tensors as peft stores them, by local name (keys of `names`)."""
        own = dict(layer.named_parameters()) | dict(layer.named_buffers())
        return {local: own[local].detach() for local in self.names(layer)}

    def values_without_model(self, data: dict[str, Any], tensors: dict[str, torch.Tensor]
                             ) -> dict[str, torch.Tensor] | None:
        """peftkit's `<module>.<local>` keys for a peft file's tensors (keys without peft's prefix), when the
        peft names alone say which module and tensor each is; None (the default) when that needs the model."""
        return None

    def recreated(self, layer: AdapterLayer, module_name: str) -> dict[str, torch.Tensor]:
        """Tensors by full peft key that a peft file may hold for this layer and peftkit re-creates rather
        than loads (RandLoRA's seeded bases): loading checks the ones present against these and drops them."""
        return {}


_CONVERTERS: dict[type[AdapterConfig], PeftConverter] = {}


def register_peft(converter: PeftConverter) -> PeftConverter:
    """Make `converter` the peft conversion of its config class (importing `peftkit.methods` does this)."""
    _CONVERTERS[converter.config_cls] = converter
    return converter


def peft_converter(cfg: AdapterConfig | type[AdapterConfig]) -> PeftConverter | None:
    """The converter of a config (instance or class), None for a method peft does not have."""
    return _CONVERTERS.get(cfg if isinstance(cfg, type) else type(cfg))


def converter_for_peft(data: dict[str, Any]) -> PeftConverter:
    """The converter that reads a peft adapter_config.json dict: of its peft_type, the one whose
    `variant` matches with the most keys."""
    peft_type = data.get("peft_type")
    fitting = [c for c in _CONVERTERS.values()
               if c.peft_type == peft_type and all(data.get(k) == v for k, v in c.variant.items())]
    if not fitting:
        known = sorted({c.peft_type for c in _CONVERTERS.values()})
        raise ConfigError(f"peftkit cannot read Hugging Face peft adapters of peft_type {peft_type!r}; "
                          f"supported peft types: {', '.join(known)}")
    return max(fitting, key=lambda c: len(c.variant))


# --- helpers for the converters' to_peft -------------------------------------------------------
def common_fields(model: nn.Module, cfg: AdapterConfig, peft_type: str) -> dict[str, Any]:
    """Fields every peft config has: type, task, base model, modules_to_save (exact module names)."""
    task = task_type(model)
    adapted = get_state(model).adapted
    if any(_under(n, h) for h in TASK_HEADS.get(task, ()) for n in adapted):
        task = None  # peft would turn the adapted head into a fully saved module and drop its adapter
    # for classification tasks peft saves the head whether it trained or not, and refuses files without it
    saved = saved_module_names(model, [*cfg.modules_to_save, *TASK_HEADS.get(task, ())])
    clash = [n for n in adapted if any(_under(n, s) for s in saved)]
    if clash:
        raise ConfigError(f"peft cannot adapt modules inside modules_to_save ({_few(clash)}); "
                          "remove them from targets or from modules_to_save")
    return {"peft_type": peft_type, "task_type": task, "base_model_name_or_path": base_model_name(model),
            "revision": None, "inference_mode": True, "modules_to_save": saved or None}


def task_type(model: nn.Module) -> str | None:
    """peft's task type for a transformers model class (None when the class says nothing clear)."""
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)


def saved_module_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Exact names of the outermost modules matching modules_to_save patterns."""
    names = [n for n, _ in model.named_modules() if n and any(matches(n, p) for p in patterns)]
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def _under(name: str, module: str) -> bool:
    """peft's test for "inside a modules_to_save module": `module` is a run of whole components of `name`."""
    return re.match(rf"(^|.*\.){re.escape(module)}($|\..*)", name) is not None


def target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """peft's target_modules that select exactly `names`: the names themselves, or a regex when a
    name is also the dotted suffix of a module that must not be adapted."""
    chosen = set(names)
    others = [n for n, _ in model.named_modules() if n and n not in chosen]
    if any(o.endswith("." + n) for o in others for n in names):
        return "|".join(re.escape(n) for n in sorted(names))
    return sorted(names)


def pattern_dict(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """peft's rank_pattern/alpha_pattern for per-module values: full names of the modules whose
    value differs from `default`, longest first (peft takes the first key that matches as a suffix)."""
    differing = {n: v for n, v in values.items() if v != default}
    plain = dict(sorted(differing.items(), key=lambda kv: -len(kv[0])))
    if all(_peft_pattern_value(plain, n, default) == v for n, v in values.items()):
        return plain
    return {re.escape(n): v for n, v in plain.items()}


def _peft_pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """The value peft's `get_pattern_key` picks for module `name`."""
    key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)
    return default if key is None else patterns[key]


# --- helpers for the converters' from_peft -----------------------------------------------------
def check_fields(data: dict[str, Any], cls: type, used: Iterable[str], inert: dict[str, Any]) -> None:
    """Refuse fields peft's config does not have, and inert fields set to a value peftkit cannot honour.

    Args:
        used: fields the config class translates.
        inert: fields peftkit reads as having no effect when left at their peft default (given here).
    """
    known = set(ANY_VALUE) | set(used) | set(inert)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"adapter_config.json has field(s) {unknown} that peftkit does not know for "
                          f"{data.get('peft_type')}; known fields: {', '.join(sorted(known))}")
    unsupported = [f"{k}={data[k]!r}" for k, default in inert.items() if k in data and data[k] not in (default, None)]
    if unsupported:
        raise ConfigError(f"{cls.__name__} cannot express peft's {', '.join(unsupported)}; "
                          "only the peft defaults of these fields are supported")


def peft_targets(value: list[str] | str | None) -> list[str]:
    """peft's target/exclude modules (a list of suffixes, or one regex) in peftkit's target syntax."""
    if value is None:
        return []
    if isinstance(value, str):
        return ["re:" + value]
    return list(value)


def peft_layers(data: dict[str, Any]) -> list[int] | None:
    """peft's layers_to_transform as peftkit's `layers` (the first integer in a module's name)."""
    value = data.get("layers_to_transform")
    if value is None or value == []:
        return None
    return [value] if isinstance(value, int) else list(value)


def peft_saved_modules(data: dict[str, Any]) -> list[str]:
    """modules_to_save without the duplicates peft adds for classification tasks."""
    saved = data.get("modules_to_save") or []
    return list(dict.fromkeys([saved] if isinstance(saved, str) else saved))
