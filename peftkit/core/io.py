"""Adapter files: safetensors tensors plus a JSON config, never pickle.

A peftkit adapter directory holds

* `peftkit_adapter.json`: `{"peftkit_version", "config", "base_fingerprint"}`;
* `adapter.safetensors`: the adapter's tensors under the model's own module names
  (`model.layers.0.self_attn.q_proj.lora_A`).

`save(..., format="peft")` and loading a directory that Hugging Face peft wrote go through
`peft_format.py`, where the key map lives.

Loading is all-or-nothing: the file is read and checked completely (config, keys, shapes, base
fingerprint) before the model is touched, and any failure afterwards undoes the `apply`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .apply import apply, fingerprint, get_module, get_state, has_adapter, unload
from .config import AdapterConfig, ConfigError
from .layer import AdapterLayer
from .registry import config_from_dict

CONFIG_FILE = "peftkit_adapter.json"
WEIGHTS_FILE = "adapter.safetensors"


class AdapterFileError(ValueError):
    """An adapter directory is missing, truncated, corrupt or does not fit the model."""


def _version() -> str:
    from .. import __version__

    return __version__


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (its parameters, persistent buffers and selected parameters)."""
    state = get_state(model)
    keys = set(state.selected)
    for name in state.adapted:
        layer: AdapterLayer = get_module(model, name)
        local = {n for n, _ in layer.named_parameters()} | {n for n, _ in layer.named_buffers()}
        keys |= {f"{name}.{n}" for n in local if not n.startswith("base.")}
    keys = {k.replace(".base.", ".") for k in keys}
    full = model.state_dict(keep_vars=False)
    missing = keys - set(full)
    if missing:  # a non-persistent buffer: not part of the adapter file
        keys -= missing
    return {k: full[k] for k in sorted(keys)}


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into an adapted model after checking keys and shapes (all or nothing)."""
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"adapter keys do not fit this model: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise AdapterFileError("adapter tensor shapes do not fit this model: " + "; ".join(wrong[:5]))
    model.load_state_dict(tensors, strict=False)
    for name in get_state(model).adapted:
        get_module(model, name).after_load()


def base_model_name(model: nn.Module) -> str | None:
    """The name or path the model was loaded from (transformers' `config._name_or_path`), if known."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _few(names: list[str]) -> str:
    return "none" if not names else ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model: nn.Module, directory: str | os.PathLike, format: str = "peftkit") -> Path:
    """Write the adapter only (not the base model) to `directory`; returns the path.

    Args:
        format: "peftkit" (default) or "peft" for the Hugging Face peft layout
            (`adapter_config.json` + `adapter_model.safetensors`), loadable by peft and vLLM.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if format == "peft":
        from .peft_format import save_peft

        save_peft(model, directory)
        return directory
    if format != "peftkit":
        raise ValueError(f"unknown format {format!r}; use 'peftkit' or 'peft'")
    state = get_state(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {"peftkit_version": _version(), "base_model": base_model_name(model), "config": state.config.to_dict(),
            "base_fingerprint": state.fingerprint}
    tensors, stacked = stack_blocks(tensors)
    metadata = {"format": "pt", "stacked": json.dumps(stacked, separators=(",", ":"))}
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=metadata))
    _atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(meta, separators=(",", ":"))))
    return directory


def _block_pattern(key: str) -> tuple[str, int] | None:
    parts = key.split(".")
    i = next((j for j, part in enumerate(parts) if part.isdigit()), None)
    return None if i is None else (".".join(parts[:i] + ["*"] + parts[i + 1 :]), int(parts[i]))


def stack_blocks(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Stack tensors whose names differ only in the block index into one (n_blocks, ...) tensor.

    "model.layers.0.self_attn.q_proj.lora_A" ... "model.layers.5...." become one tensor under
    "model.layers.*.self_attn.q_proj.lora_A" when their shapes and dtypes agree. Why: the safetensors
    header costs ~100 bytes per tensor, which for a LoRA on every linear layer of a deep model is more
    than the adapter's whole config; stacking keeps the file at its tensors' size plus a few KiB.
    Returns the new dict and {pattern: block indices in stacking order}.
    """
    groups: dict[str, list[tuple[int, str]]] = {}
    for key in tensors:
        found = _block_pattern(key)
        if found is not None:
            groups.setdefault(found[0], []).append((found[1], key))
    out, index = {}, {}
    for pattern, members in groups.items():
        if len(members) > 1 and len({(tensors[k].shape, tensors[k].dtype) for _, k in members}) == 1:
            members.sort()
            out[pattern] = torch.stack([tensors[k] for _, k in members])
            index[pattern] = [i for i, _ in members]
    done = {pattern.replace("*", str(i), 1) for pattern, idx in index.items() for i in idx}
    out.update({k: v for k, v in tensors.items() if k not in done})
    return out, index


def unstack_blocks(tensors: dict[str, torch.Tensor], index: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Inverse of `stack_blocks`."""
    out = {k: v for k, v in tensors.items() if k not in index}
    for pattern, indices in index.items():
        stacked = tensors.get(pattern)
        if stacked is None or stacked.shape[0] != len(indices):
            raise AdapterFileError(f"stacked tensor {pattern} does not match its index {indices}; save the adapter again")
        out.update({pattern.replace("*", str(i), 1): t.clone() for i, t in zip(indices, stacked.unbind(0), strict=True)})
    return out


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file fully, turning any corruption into an AdapterFileError."""
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path} is truncated or corrupt ({err}); save the adapter again") from err


def read_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor]]:
    """(config, metadata, tensors) of a peftkit adapter directory, fully validated as files."""
    directory = Path(directory)
    meta_path = directory / CONFIG_FILE
    if not meta_path.is_file():
        raise AdapterFileError(f"{directory} holds no {CONFIG_FILE} (nor a Hugging Face adapter_config.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{meta_path} is not valid JSON ({err})") from err
    cfg = config_from_dict(meta["config"])
    tensors = read_tensors(directory / WEIGHTS_FILE)
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:  # already validated by read_tensors
        stacked = json.loads((f.metadata() or {}).get("stacked", "{}"))
    return cfg, meta, unstack_blocks(tensors, stacked)


def check_fingerprint(saved: dict, current: dict, rtol: float = 1e-3) -> list[str]:
    """Modules whose shape or weights differ between the saved and the current base."""
    differ = []
    for name, (shape, checksum) in saved.items():
        now = current.get(name)
        if now is None:
            differ.append(f"{name} (missing)")
        elif now[0] != shape:
            differ.append(f"{name} (shape {shape} -> {now[0]})")
        else:
            scale = max(abs(checksum[1]), 1e-12)
            if any(abs(a - b) > rtol * scale for a, b in zip(checksum, now[1], strict=True)):
                differ.append(f"{name} (weights differ)")
    return differ


def load(model: nn.Module, directory: str | os.PathLike, *, allow_different_base: bool = False) -> nn.Module:
    """Apply the adapter saved in `directory` to `model` and load its weights; returns the model.

    Reads peftkit directories and ones Hugging Face peft wrote. The model is left exactly as it
    was when anything fails. `allow_different_base=True` accepts a base whose weights differ from
    the one the adapter was trained on (shapes must still match).
    """
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() and (directory / "adapter_config.json").is_file():
        from .peft_format import read_peft

        cfg, tensors_for = read_peft(directory)
        return _apply_and_fill(model, cfg, tensors_for)
    if has_adapter(model):
        raise ConfigError("model already has a peftkit adapter; call peftkit.unload(model) first")
    cfg, meta, tensors = read_adapter(directory)
    saved = meta.get("base_fingerprint", {})
    differ = check_fingerprint(saved, fingerprint(model, list(saved)))
    if differ and not (allow_different_base and all("weights differ" in d for d in differ)):
        raise AdapterFileError(
            "this adapter was trained on a different base model; modules that differ: "
            + _few(differ) + ". Pass allow_different_base=True to load it anyway (shapes must match)."
        )
    return _apply_and_fill(model, cfg, lambda m: tensors)


def _apply_and_fill(model: nn.Module, cfg: AdapterConfig, tensors_for) -> nn.Module:
    apply(model, cfg, init=False)
    try:
        load_adapter_state_dict(model, tensors_for(model))
    except BaseException:
        unload(model)
        raise
    return model


def load_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load saved adapter weights into a model that already has the same adapter applied."""
    _, _, tensors = read_adapter(directory)
    load_adapter_state_dict(model, tensors)
    return model
