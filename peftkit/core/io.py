"""Adapter files: safetensors tensors plus a JSON config, never pickle.

A peftkit adapter directory holds

* `peftkit_adapter.json`: `{"peftkit_version", "base_model", "config", "base_fingerprint",
  "weights_sha256"}`;
* `adapter.safetensors`: the adapter's tensors under the model's own module names
  (`model.layers.0.self_attn.q_proj.lora_A`).

The two files are one unit: the JSON records the sha256 of the tensor file it was saved with, and
`load` refuses a pair whose digests differ (a save killed between its two renames, or two saves into
one directory at once, would otherwise pair one save's weights with another's config). A directory
holds one adapter in one format: `save` removes the other format's files, and `load` refuses a
directory holding both.

`save(..., format="peft")` and loading a directory that Hugging Face peft wrote go through
`peft_format.py` (the layout), which asks each method's converter in `methods/peft/` for the key map.

Loading is all-or-nothing: the file is read and checked completely (config, keys, shapes, base
fingerprint, finite values) before the model is touched, and any failure afterwards undoes the
`apply`. See `files.py` for the checks on the safetensors header and `fingerprint.py` for the base's.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from . import weights
from .adapters import DEFAULT, adapters, current, plain_parameters
from .apply import apply, get_module, get_state, has_adapter, unload
from .config import AdapterConfig, ConfigError
from .files import (
    AdapterFileError,
    atomic_write,
    check_finite,
    read_json,
    read_json_names,
    read_safetensors,
    sha256_file,
    stack_blocks,
    unstack_blocks,
)
from .fingerprint import check_entry, same_weight
from .packed import pack_tensors, unpack_tensors
from .registry import config_from_dict
from .snapshot import ModelSnapshot

CONFIG_FILE = "peftkit_adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
ORDER_FILE = "adapter_order.json"
"""In a directory saved from a model with several adapters: their names in the order they were applied."""
"""What `save(..., format="peft")` writes (peft_format.py); a directory holds one format or the other."""

def _version() -> str:
    from .. import __version__

    return __version__


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """An adapter's tensors (its layers' parameters and persistent buffers, and the base parameters it trains
    in place), by the model's own module names: `<module>.<local name>`, whatever the module is called and
    whichever adapters are stacked on it."""
    return {k: v.detach() for k, v in sorted(_live_tensors(model, name).items())}


def _live_tensors(model: nn.Module, name: str | None) -> dict[str, torch.Tensor]:
    state = get_state(model, name)
    params = plain_parameters(model)
    out = {n: state.stash.get(n, params[n]) for n in state.selected}  # inactive: its values wait in the stash
    for module_name, layer in state.layers.items():
        out |= {f"{module_name}.{local}": t for local, t in layer.adapter_tensors().items()}
    return out


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], name: str | None = None) -> None:
    """Copy saved tensors into an adapted model after checking keys and shapes (all or nothing)."""
    expected = adapter_state_dict(model, name)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"adapter keys do not fit this model: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise AdapterFileError("adapter tensor shapes do not fit this model: " + "; ".join(wrong[:5]))
    kinds = [f"{k}: file {tensors[k].dtype} vs model {v.dtype}"
             for k, v in expected.items() if _kind(tensors[k].dtype) != _kind(v.dtype)]
    if kinds:  # a copy would silently cast an integer or bool tensor into a float parameter
        raise AdapterFileError("adapter tensor types do not fit this model: " + "; ".join(kinds[:5])
                               + "; the file was not written by peftkit.save for this adapter")
    state = get_state(model, name)
    params = plain_parameters(model)
    with torch.no_grad():
        for n in state.selected:  # an inactive adapter's values wait in its stash
            (state.stash[n] if n in state.stash else params[n]).copy_(tensors[n])
    for module_name, layer in state.layers.items():  # the layer's own load hooks run (methods may resize)
        own = {local: tensors[f"{module_name}.{local}"] for local in layer.adapter_tensors()}
        layer.load_state_dict(own, strict=False)
    for layer in state.layers.values():
        layer.after_load()


def _kind(dtype: torch.dtype) -> str:
    """float, complex, bool or int: tensors of one kind may be cast into each other on load, not across."""
    if dtype.is_floating_point or dtype.is_complex:
        return "complex" if dtype.is_complex else "float"
    return "bool" if dtype == torch.bool else "int"


def base_model_name(model: nn.Module) -> str | None:
    """The name or path the model was loaded from (transformers' `config._name_or_path`), if known."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _few(names: list[str]) -> str:
    return "none" if not names else ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def remove_files(directory: Path, names: tuple[str, ...]) -> None:
    """Delete a directory's files of the other adapter format, config first (so no stale pair is left)."""
    for name in names:
        (directory / name).unlink(missing_ok=True)


def save(model: nn.Module, directory: str | os.PathLike, format: str = "peftkit", name: str | None = None) -> Path:
    """Write adapter `name` (not the base model) to `directory`; returns the path.

    Without a name, adapters are written as peft writes them: "default" into `directory`, every other one
    into `directory/<name>/` (`load` reads the names back, and so does peft's `load_adapter`); with a name,
    that adapter is written into `directory` itself.

    Saving replaces the adapter in `directory`, in either format: the files of the other format are
    deleted once the new ones are in place (otherwise `load` would find two adapters there). The
    weights are written first and the config, which records their sha256, last, each by an atomic
    rename; files get the permissions `open()` gives (0o666 minus the umask).

    Args:
        format: "peftkit" (default) or "peft" for the Hugging Face peft layout
            (`adapter_config.json` + `adapter_model.safetensors`), loadable by peft and vLLM.
    """
    directory = Path(directory)
    if format not in ("peftkit", "peft"):
        raise ValueError(f"unknown format {format!r}; use 'peftkit' or 'peft'")
    names = [name] if name is not None else adapters(model) or [None]
    if name is None and (len(names) > 1 or names[0] not in (DEFAULT, None)):  # peft's layout keeps the names
        for each in names:
            save(model, directory if each == DEFAULT else directory / each, format=format, name=each)
        if format == "peftkit":  # stacked adapters compute in the order they were applied: load keeps it
            atomic_write(directory / ORDER_FILE, lambda p: Path(p).write_text(json.dumps(names)))
        return directory
    name = names[0]
    if name is not None:
        get_state(model, name)  # an unknown name fails before anything is written
    with current(model, name) if name is not None else contextlib.nullcontext():
        if format == "peft":
            from .peft_format import save_peft

            _refuse_non_finite(adapter_state_dict(model))
            directory.mkdir(parents=True, exist_ok=True)
            save_peft(model, directory)
            remove_files(directory, (CONFIG_FILE, WEIGHTS_FILE))
            return directory
        state = get_state(model)
        meta = {"base_model": base_model_name(model), "base_fingerprint": state.fingerprint}
        return write_adapter(directory, state.config, adapter_state_dict(model), meta)


def write_adapter(directory: str | os.PathLike, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                  meta: dict | None = None) -> Path:
    """Write an adapter given as values (config, tensors by the model's key names) in peftkit's format.

    What `save` writes for a model, for code that makes adapters without one (combining, compressing,
    aggregating state dicts). `meta` may carry "base_model" and "base_fingerprint" (as `read_adapter`
    returns them), so the written adapter is checked against its base like a saved one, and
    "pack_ternary": keys of tensors in {−s, 0, +s} to store as positions + sign bits + s (packed.py).
    """
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _refuse_non_finite(tensors)
    directory.mkdir(parents=True, exist_ok=True)
    given = meta or {}
    meta = {"peftkit_version": _version(), "base_model": given.get("base_model"),
            "config": config.to_dict(), "base_fingerprint": given.get("base_fingerprint", {})}
    if given.get("pack_ternary"):  # e.g. ComPEFT's output: positions + sign bits + one scalar (packed.py)
        tensors, meta["packed"] = pack_tensors(tensors, list(given["pack_ternary"]))
        meta["compression"] = given.get("compression")
    tensors, stacked = stack_blocks(tensors)
    metadata = {"format": "pt", "stacked": json.dumps(stacked, separators=(",", ":"))}
    digest: list[str] = []
    atomic_write(directory / WEIGHTS_FILE, lambda p: (save_file(tensors, p, metadata=metadata),
                                                      digest.append(sha256_file(p))))
    meta["weights_sha256"] = digest[0]
    atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(meta, separators=(",", ":"))))
    remove_files(directory, PEFT_FILES)
    return directory


def _refuse_non_finite(tensors: dict[str, torch.Tensor]) -> None:
    """`load` refuses a file holding NaN/inf: such tensors must not replace a good adapter on disk."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterFileError(f"not saved: adapter tensor(s) {_few(sorted(bad))} hold NaN or infinite values (the "
                               "run diverged); save from an earlier checkpoint, or train again with a lower lr")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file fully after checking its header (files.read_safetensors)."""
    return read_safetensors(path)[0]


def adapter_format(directory: str | os.PathLike) -> str | None:
    """"peftkit", "peft" or None (no adapter) for a directory; refuses one that holds both."""
    directory = Path(directory)
    ours, peft = (directory / CONFIG_FILE).is_file(), (directory / PEFT_FILES[0]).is_file()
    if ours and peft:
        raise AdapterFileError(
            f"{directory} holds two adapters: a peftkit one ({CONFIG_FILE}) and a Hugging Face peft one "
            f"({PEFT_FILES[0]}), so which one to load is unclear; delete the stale one's files or save again "
            "(peftkit.save replaces the other format's files)")
    return "peftkit" if ours else "peft" if peft else None


def read_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor]]:
    """(config, metadata, tensors) of a peftkit adapter directory, fully validated as files.

    Checked: one adapter format in the directory, the JSON's fields and their types, the safetensors
    header, the weights' sha256 against the one the JSON recorded, and that no tensor holds NaN/inf.
    """
    directory = Path(directory)
    meta_path = directory / CONFIG_FILE
    if adapter_format(directory) != "peftkit":
        raise AdapterFileError(f"{directory} holds no {CONFIG_FILE} (nor a Hugging Face adapter_config.json)")
    meta = read_json(meta_path)
    if "config" not in meta:
        raise AdapterFileError(f"{meta_path} has no 'config' field; save the adapter again")
    try:
        cfg = config_from_dict(meta["config"])
    except ConfigError as err:
        raise ConfigError(f"{meta_path}, field 'config': {err}") from err
    _check_meta(meta_path, meta)
    weights_path = directory / WEIGHTS_FILE
    tensors, metadata, digest = read_safetensors(weights_path)
    if meta.get("weights_sha256", digest) != digest:
        raise AdapterFileError(
            f"{weights_path} and {meta_path} are from different saves (sha256 of the weights "
            f"{digest[:12]}..., the config expects {meta['weights_sha256'][:12]}...): a save was interrupted, "
            "two saves wrote this directory at once, or the weights were edited; save the adapter again (weights "
            "edited on purpose: delete the config's 'weights_sha256' field)")
    check_finite(weights_path, tensors)
    tensors = unstack_blocks(tensors, _stacked_index(weights_path, metadata))
    if "packed" in meta:  # sparse ternary tensors (packed.py), decoded only after the digest and header checks
        tensors = unpack_tensors(weights_path, tensors, meta["packed"])
    return cfg, meta, tensors


def _check_meta(path: Path, meta: dict) -> None:
    """Types of the JSON's fields other than the config (the fingerprint is checked entry by entry)."""
    prints = meta.get("base_fingerprint", {})
    if not isinstance(prints, dict):
        raise AdapterFileError(f"{path}, field 'base_fingerprint' must be an object, got {prints!r:.80}")
    for name, entry in prints.items():
        problem = check_entry(entry)
        if problem:
            raise AdapterFileError(f"{path}, field 'base_fingerprint' of {name!r}: {problem}; got {entry!r:.80}")
    if not isinstance(meta.get("weights_sha256", ""), str):
        raise AdapterFileError(f"{path}, field 'weights_sha256' must be a hex string")


def _stacked_index(path: Path, metadata: dict[str, str]) -> dict[str, list[int]]:
    try:
        index = json.loads(metadata.get("stacked", "{}"))
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path}: its 'stacked' metadata is not JSON ({err}); save the adapter again") from err
    if not isinstance(index, dict) or not all(
            isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            for v in index.values()):
        raise AdapterFileError(f"{path}: its 'stacked' metadata must map names to lists of block indices")
    return index


def base_weight(model: nn.Module, name: str) -> torch.Tensor | None:
    """The canonical base weight of module `name` (under its AdapterLayer if adapted), None if it has none."""
    try:
        module = get_module(model, name)
    except AttributeError:
        return None
    module = weights.plain(module)
    return weights.get_weight(module) if weights.layer_kind(module) is not None else None


def check_fingerprint(saved: dict, model: nn.Module) -> list[str]:
    """Modules whose shape or weights differ between the saved base and `model` (fingerprint.py)."""
    differ = []
    for name, (shape, checksum) in saved.items():
        weight = base_weight(model, name)
        if weight is None:
            differ.append(f"{name} (missing)")
        elif list(weight.shape) != shape:
            differ.append(f"{name} (shape {shape} -> {list(weight.shape)})")
        elif not same_weight(checksum, weight):
            differ.append(f"{name} (weights differ)")
    return differ


def load(model: nn.Module, directory: str | os.PathLike, *, name: str | None = None,
         allow_different_base: bool = False) -> nn.Module:
    """Apply the adapter saved in `directory` to `model` and load its weights; returns the model.

    Reads peftkit directories and ones Hugging Face peft wrote. A directory saved from a model with several
    adapters (the adapter "default" in it, the others in subdirectories) loads them all when no `name` is
    given; `name=` loads `directory/<name>` if there is one, else the adapter in `directory` under that name.
    The model is left exactly as it was when anything fails. `allow_different_base=True` accepts a base
    whose weights differ from the one the adapter was trained on (shapes must still match): see
    `fingerprint.py` for what counts as the same base (a bf16 or fp16 copy of it does).
    """
    directory = Path(directory)
    if name is None:
        found = saved_adapters(directory)
        if len(found) > 1 or (found and found[0][0] != DEFAULT):
            undo, loaded = ModelSnapshot(model), []
            try:
                for each, path in found:
                    load(model, path, name=each, allow_different_base=allow_different_base)
                    loaded.append(each)
            except BaseException:
                for each in reversed(loaded):  # gives back the base values they wrote (selected parameters)
                    with contextlib.suppress(Exception):
                        unload(model, each)
                undo.restore()
                raise
            return model
    elif adapter_format(directory / name) is not None:
        directory = directory / name
    if adapter_format(directory) == "peft":
        from .peft_format import read_peft

        cfg, tensors_for = read_peft(directory)
        return _apply_and_fill(model, cfg, tensors_for, name)
    if has_adapter(model) and name is None:
        raise ConfigError("model already has a peftkit adapter; call peftkit.unload(model) first, or load this one "
                          "under another name (peftkit.load(model, directory, name=...))")
    cfg, meta, tensors = read_adapter(directory)
    differ = check_fingerprint(meta.get("base_fingerprint", {}), model)
    if differ and not (allow_different_base and all("weights differ" in d for d in differ)):
        raise AdapterFileError(
            "this adapter was trained on a different base model; modules that differ: "
            + _few(differ) + ". Pass allow_different_base=True to load it anyway (shapes must match)."
        )
    return _apply_and_fill(model, cfg, lambda m: tensors, name)


def saved_adapters(directory: Path) -> list[tuple[str, Path]]:
    """(name, path) of the adapters in a directory: its own ("default") and its subdirectories' (peft's layout),
    in the order they were applied when peftkit saved them (`adapter_order.json`), else "default" first."""
    found = [(DEFAULT, directory)] if adapter_format(directory) is not None else []
    if directory.is_dir():
        found += [(p.name, p) for p in sorted(directory.iterdir()) if p.is_dir() and adapter_format(p) is not None]
    order = read_json_names(directory / ORDER_FILE) if (directory / ORDER_FILE).is_file() else []
    return sorted(found, key=lambda item: order.index(item[0]) if item[0] in order else len(order))


def _apply_and_fill(model: nn.Module, cfg: AdapterConfig, tensors_for, name: str | None = None) -> nn.Module:
    # filled inside apply's rollback: a failure (a bad tensor, after_load, KeyboardInterrupt) puts the model
    # back bit for bit, where unload would only subtract a PiSSA residual again
    return apply(model, cfg, name=name, init=False, fill=lambda m: load_adapter_state_dict(m, tensors_for(m)))


def load_weights(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Load saved adapter weights into a model that already has the same adapter applied."""
    _, _, tensors = read_adapter(directory)
    load_adapter_state_dict(model, tensors, name)
    return model
