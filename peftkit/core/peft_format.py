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
and export form of the layers' tensors. The converter base, its registry and the helpers converters
share (`target_modules`, `common_fields`, `check_fields` ...) are in `peft_convert.py`; this file holds
the layout all types share; neither knows a method.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .apply import get_state
from .config import AdapterConfig, ConfigError
from .files import check_finite, read_json, read_safetensors
from .io import AdapterFileError, _few, adapter_state_dict, atomic_write
from .layer import AdapterLayer
from .params import parameters_of_modules
from .peft_convert import PeftConverter, converter_for_peft, peft_converter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

PROMPT_LEARNING = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "CARTRIDGE"}
"""peft types whose `PeftModel.base_model` is the transformers model itself (key prefix `base_model.`)."""

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
