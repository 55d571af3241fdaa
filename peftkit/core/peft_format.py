"""Hugging Face peft's adapter layout, both directions; the only place that maps key names.

peft (checked against 0.21.2) writes `adapter_config.json` (the fields of its config class) and
`adapter_model.safetensors`, whose keys are a module path under peft's wrapper plus peft's own
tensor name:

* adapted modules: `base_model.model.<module>.<peft name>`, e.g. `...q_proj.lora_A.weight`,
  `...embed_tokens.lora_embedding_A`, `...q_proj.lora_magnitude_vector` (DoRA), `...k_proj.ia3_l`;
* prompt learning: `prompt_embeddings`, with no module path;
* modules_to_save: the module's own parameter names under `base_model.model.` (`base_model.` for
  prompt learning, where peft wraps the transformers model one level less deep);
* for adapted embeddings peft also writes the base table (`...embed_tokens.base_layer.weight`):
  peftkit checks on load that it equals the model's, and does not write it.

What is particular to one peft type lives in `peftkit/methods/peft/<type>.py`, one `PeftConverter`
per method that peft also has (registered with `register_peft`): the config both ways and the names
and export form of the layers' tensors. This file holds the layout all types share and the helpers
the converters use (`target_modules`, `common_fields`, `check_fields` ...); it knows no method.

Saving writes the weights first, with the sha256 of the config text in their metadata
(`peftkit_config_sha256`, which peft ignores), then the config; `read_peft` refuses a pair whose
digests differ (an interrupted save, two saves at once). Files peft itself wrote carry no digest.

Reading is all-or-nothing: `read_peft` validates the JSON, the types of the fields every peft config
shares, the config fields and the safetensors file (no NaN/inf) before the model is touched; `tensors_for(model)`, called after `apply(..., init=False)`,
raises when keys or shapes do not fit, and `io.load` then undoes the `apply`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .apply import get_state
from .config import AdapterConfig, ConfigError
from .files import check_finite, read_safetensors
from .inject import matches
from .io import AdapterFileError, _few, adapter_state_dict, atomic_write, base_model_name, read_json
from .layer import AdapterLayer
from .params import parameters_of_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

PROMPT_LEARNING = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "CARTRIDGE"}
"""peft types whose `PeftModel.base_model` is the transformers model itself (key prefix `base_model.`)."""

TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}
"""Model class name suffix -> peft task type (only unambiguous ones)."""

TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
"""Modules peft adds to modules_to_save by itself for a task type (and then never adapts)."""

DIGEST_KEY = "peftkit_config_sha256"
"""Metadata key of the weights file: sha256 of the adapter_config.json saved with them."""

NONE = type(None)
FIELD_TYPES = {"peft_type": str, "task_type": (str, NONE), "r": (int, NONE), "lora_alpha": (int, float, NONE),
               "lora_dropout": (int, float), "target_modules": (str, list, NONE), "exclude_modules": (str, list, NONE),
               "modules_to_save": (str, list, NONE), "layers_to_transform": (int, list, NONE),
               "rank_pattern": (dict, NONE), "alpha_pattern": (dict, NONE), "use_rslora": bool, "use_dora": bool,
               "init_lora_weights": (bool, str), "num_virtual_tokens": int, "feedforward_modules": (str, list, NONE),
               "init_weights": (bool, str, NONE)}
"""JSON types of fields many peft configs share (the union of their annotations in peft 0.21.2), checked
before any config class reads them; a bool is not accepted for a number."""

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


# --- writing -----------------------------------------------------------------------------------
def save_peft(model: nn.Module, directory: Path) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` as Hugging Face peft would."""
    cfg = get_state(model).config
    converter = peft_converter(cfg)
    if converter is None:
        raise ConfigError(f"method {cfg.method!r} has no Hugging Face peft equivalent, so it cannot be saved with "
                          "format='peft'; save it with format='peftkit' (the default)")
    data = converter.to_peft(cfg, model)
    saved = parameters_of_modules(model, data.get("modules_to_save") or [])
    state = peft_state_dict(model, converter, saved)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    directory = Path(directory)
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    metadata = {"format": "pt", DIGEST_KEY: hashlib.sha256(text).hexdigest()}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=metadata))
    atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_bytes(text))


def peft_state_dict(model: nn.Module, converter: PeftConverter, saved: list[str]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's key names; `saved`: parameters of peft's modules_to_save."""
    state = get_state(model)
    out = {}
    for name in state.adapted:
        layer: AdapterLayer = state.layers[name]
        for local, tensor in converter.export(layer).items():
            out[converter.key(layer, name, local)] = tensor
    params = dict(model.named_parameters())
    prefix = saved_module_prefix(converter.peft_type)
    for name in sorted({*state.selected, *saved}):
        out[prefix + name] = params[name]
    return out


def saved_module_prefix(peft_type: str) -> str:
    """Key prefix of modules_to_save parameters in a peft file."""
    return "base_model." if peft_type in PROMPT_LEARNING else "base_model.model."


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


# --- reading -----------------------------------------------------------------------------------
def read_peft(directory: Path) -> tuple[AdapterConfig, Callable[[nn.Module], dict[str, torch.Tensor]]]:
    """(config, tensors_for) of a directory that Hugging Face peft wrote, fully validated as files.

    `tensors_for(model)` must be called after `apply(model, config, init=False)`; it returns the
    adapter state dict in peftkit's key names and raises AdapterFileError when the file does not fit.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    data = read_json(path)
    if "peft_type" not in data:
        raise AdapterFileError(f"{path} is not a peft adapter config (no 'peft_type')")
    cfg = _peft_config(path, data)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() and (directory / "adapter_model.bin").is_file():
        raise AdapterFileError(f"{directory} holds adapter_model.bin (pickle), which peftkit never loads; "
                               "re-save it with peft's save_pretrained(..., safe_serialization=True)")
    tensors, metadata, _ = read_safetensors(weights)
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and expected != hashlib.sha256(path.read_bytes()).hexdigest():
        raise AdapterFileError(f"{weights} and {path} are from different saves (the weights record another config's "
                               "sha256): a save was interrupted or two saves wrote this directory at once; save again")
    check_finite(weights, tensors)
    prefix = saved_module_prefix(data["peft_type"])
    return cfg, lambda model: from_peft_keys(model, tensors, prefix)


def read_peft_values(directory: Path) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor]]:
    """(config, meta, tensors) of a peft adapter directory without a model, as `io.read_adapter` gives for
    peftkit's (for `combine` and `compress`), where the type's converter can name the tensors by key alone
    (`PeftConverter.values_without_model`: plain LoRA). Other adapters need the model: load them
    (`peftkit.load`) and save them with peftkit first."""
    directory = Path(directory)
    data = read_json(directory / CONFIG_FILE)
    cfg = _peft_config(directory / CONFIG_FILE, data)
    raw, _, _ = read_safetensors(directory / WEIGHTS_FILE)
    check_finite(directory / WEIGHTS_FILE, raw)
    prefix = saved_module_prefix(str(data.get("peft_type")))
    body = {(key[len(prefix):] if key.startswith(prefix) else key): value for key, value in raw.items()}
    tensors = converter_for_peft(data).values_without_model(data, body)
    if tensors is None:
        raise AdapterFileError(f"{directory}: a {data.get('peft_type')} adapter like this one is read with its base "
                               "model only; load it with peftkit.load and save it with peftkit.save first")
    meta = {"base_model": data.get("base_model_name_or_path"), "base_fingerprint": {}}
    return cfg, meta, tensors


def _peft_config(path: Path, data: dict[str, Any]) -> AdapterConfig:
    """The peftkit config of a peft adapter_config.json; a wrong field type or value names the file."""
    wrong = [f"{k}={data[k]!r:.40}" for k, kind in FIELD_TYPES.items()
             if k in data and (not isinstance(data[k], kind) or (kind is int and isinstance(data[k], bool)))]
    if wrong:
        raise ConfigError(f"{path}: field(s) of the wrong JSON type: {', '.join(wrong)}")
    try:
        return converter_for_peft(data).from_peft(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    except (TypeError, KeyError, AttributeError, ValueError) as err:  # a field of a type the method did not expect
        raise ConfigError(f"{path}: a field has a type or value peftkit cannot read ({type(err).__name__}: {err}); "
                          "compare it with the adapter_config.json peft writes") from err


def from_peft_keys(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A peft state dict in peftkit's key names, for a model the adapter was just applied to."""
    state = get_state(model)
    converter = peft_converter(state.config)
    expected = adapter_state_dict(model)
    left = dict(tensors)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name in state.adapted:
        layer: AdapterLayer = state.layers[name]
        names = converter.names(layer)
        for local in names:
            if f"{name}.{local}" not in expected:
                continue
            key = converter.key(layer, name, local)
            if key in left:
                out[f"{name}.{local}"] = left.pop(key)
            else:
                missing.append(key)
        _check_base_copies(layer, f"{prefix}{name}.base_layer.", left)
        _check_recreated(converter.recreated(layer, name), layer, name, left)
        derived = [k for k in expected if k.startswith(name + ".") and k[len(name) + 1:] not in names]
        if derived:
            out.update(_derive(layer, name, derived))
    for name in state.selected:
        if prefix + name in left:
            out[name] = left.pop(prefix + name)
        else:
            missing.append(prefix + name)
    if missing or left:
        raise AdapterFileError(f"the peft adapter does not fit this model: missing {_few(sorted(missing))}, "
                               f"unexpected {_few(sorted(left))}; was it saved for another base model?")
    return out


def _check_base_copies(layer: AdapterLayer, prefix: str, left: dict[str, torch.Tensor]) -> None:
    """peft saves adapted embeddings' base tables too; they must equal this model's (then they are dropped)."""
    for pname, param in layer.base.named_parameters():
        saved = left.pop(prefix + pname, None)
        if saved is None:
            continue
        if saved.shape != param.shape or not torch.allclose(saved.to(param.dtype), param.detach(), atol=1e-6):
            raise AdapterFileError(f"the peft adapter carries its own {prefix}{pname} (a changed or resized base "
                                   "layer); peftkit adapters never change base weights, load it with peft")


def _check_recreated(recreated: dict[str, torch.Tensor], layer: AdapterLayer, name: str,
                     left: dict[str, torch.Tensor]) -> None:
    """Tensors peft saved that peftkit re-creates (RandLoRA's bases): equal to peftkit's, then dropped."""
    for key, value in recreated.items():
        saved = left.pop(key, None)
        if saved is not None and (saved.shape != value.shape or not torch.equal(saved.to(value), value)):
            raise AdapterFileError(f"the peft adapter's {key} differs from the tensor peftkit re-creates for {name} "
                                   f"({type(layer).__name__}: see its method's documentation for how it is drawn)")


def _derive(layer: AdapterLayer, name: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """Tensors peft does not save but re-creates on load by running the method's initialisation
    on the original base (PiSSA/OLoRA's initial factors): do the same, on a copy of the layer."""
    twin = copy.deepcopy(layer)
    twin.reset_parameters()
    own = dict(twin.named_parameters()) | dict(twin.named_buffers())
    return {k: own[k[len(name) + 1:]].detach() for k in keys}
