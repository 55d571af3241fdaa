"""`peftkit train config.yaml [--key value ...]`: a whole fine-tuning run from one YAML file.

    model:   {name: minilm, task: classification}          # built-in, local directory or Hub name
    data:    {dataset: rotten_tomatoes, max_length: 64, train_size: 2000}
    method:  lora                                           # any registered method
    adapter: {r: 8, alpha: 16}                              # that method's config fields
    train:   {lr: 2.0e-3, max_steps: 100, batch_size: 16, output_dir: runs/lora}

Vision: `model: {name: vit-fmnist, task: image-classification}` (or cnn-fmnist, or a directory a
peftkit vision model was saved to) with `data: {dataset: mnist_5k}` (or digits, fashion_mnist).

Overrides on the command line use a section and a field (`--train.lr 1e-3`, `--adapter.r 16`), or
just the field when only one section has it (`--lr 1e-3`); values are parsed as YAML scalars.
Every value is checked against its field's type before the run starts (`max_steps: 1.5` is refused,
not truncated; `1e3` and `100.0` are read as the whole numbers they are).
For classification, the fresh head is trained with every method that does not train the head itself
(it is added to `modules_to_save` unless the config names modules itself): a random head cannot be
left frozen. Methods that need task data before `apply` (SPT's plan, LoFiT's head choice with
`top_k`) are calibrated on the first training batches (`peftkit.calibrate`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.config import ConfigError, check_value, field_docs, lenient_number
from ..core.registry import get_method, registered_methods
from .config import TrainConfig

CLASSIFICATION_TASKS = ("classification", "image-classification")


@dataclass
class ModelConfig:
    """Which model to fine-tune."""

    name: str = "minilm"
    """Built-in "minilm" (all-MiniLM-L6-v2, mean-pooling classifier), "smollm2" (SmolLM2-135M),
    "vit-fmnist" or "cnn-fmnist" (the project's ViT / CNN pretrained on Fashion-MNIST, fresh head),
    a local directory, or a Hub name (needs a network)."""

    task: str = "classification"
    """"classification" (sequence labels), "causal-lm" (next-token prediction) or
    "image-classification" (the vision models)."""

    num_labels: int | None = None
    """Classes for classification; None counts the labels of the training data."""

    def __post_init__(self) -> None:
        if self.task not in CLASSIFICATION_TASKS + ("causal-lm",):
            raise ConfigError(f"model.task must be 'classification', 'causal-lm' or 'image-classification', "
                              f"got {self.task!r}")
        if self.num_labels is not None and self.num_labels < 2:
            raise ConfigError(f"model.num_labels must be >= 2 (classes of the head) or null, got {self.num_labels}")


@dataclass
class DataConfig:
    """Which data, and how it is tokenized."""

    dataset: str = "rotten_tomatoes"
    """Built-in "rotten_tomatoes" or "shakespeare", a local .csv/.jsonl/.json/.parquet file, or a Hub
    dataset name (needs a network); for image-classification the built-in "mnist_5k", "digits" or
    "fashion_mnist" (fixed splits, see peftkit.train.images)."""

    eval_dataset: str | None = None
    """A separate evaluation file; None uses `eval_split` of `dataset` (a single local file: its last 10%)."""

    eval_split: str = "validation"
    """Split evaluated during training."""

    test_split: str | None = "test"
    """Split evaluated once at the end (None: no test evaluation)."""

    text_field: str = "text"
    """Field holding the text."""

    label_field: str = "label"
    """Field holding the class label (classification): class ids 0..N-1 or class names (saved with the
    adapter in labels.json and in metrics.json, so predictions map back to names)."""

    prompt_field: str | None = None
    """Causal LM on records: a prompt field whose tokens get no loss (instruction tuning)."""

    max_length: int = 128
    """Truncation length (classification) or block size (causal LM); at most the model's positions."""

    train_size: int | None = None
    """Train on this many examples (a fixed seeded subset); None uses all."""

    eval_size: int | None = None
    """Evaluate on this many examples; None uses all."""

    test_size: int | None = None
    """Test on this many examples; None uses all."""

    test_before_training: bool = False
    """Also evaluate the test split before the adapter is applied (held-out loss before and after)."""

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ConfigError(f"data.max_length must be a positive number of tokens, got {self.max_length}")
        for name in ("train_size", "eval_size", "test_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1 or null (all examples), got {getattr(self, name)}")


@dataclass
class RunConfig:
    """One run: model, data, method and its adapter fields, and the loop's settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: str = "lora"
    adapter: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
ALL_SECTIONS = ("model", "data", "method", "adapter", "train")


# ---- values against their fields' annotations ------------------------------------------------------

def typed_fields(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """`values` checked against the annotations of dataclass `cls`'s fields, with lossless conversions.

    YAML and `--key value` overrides hand over whatever the user wrote: `max_steps: 1.5` would be
    truncated by a range check, `lr: [1]` fails with a TypeError deep in validation, `name: 3` much
    later. Each value must fit its annotation (`int | None`, `list[str]`, `dict[str, int]` ...) by the
    rules of the adapter configs' own check (`core.config.check_value`: NaN and infinity are refused),
    after the lossless readings of `core.config.lenient_number` (`1e3` and `100.0` are ints). Keys that are not fields are left for the caller's unknown-field message.

    Raises:
        ConfigError: naming every field (as `section.field`) whose value does not fit.
    """
    hints = typing.get_type_hints(cls)
    out, errors = dict(values), []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        try:
            out[f.name] = check_value(lenient_number(values[f.name], hints[f.name]), hints[f.name],
                                   f"{section}.{f.name}")
        except ConfigError as err:
            errors.append(str(err))
    if errors:
        raise ConfigError("; ".join(errors))
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


# ---- YAML and overrides -------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    """The YAML file as a dict of sections; syntax errors name the file, line and column."""
    if not path.is_file():
        raise FileNotFoundError(f"no run config at {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{at}: not valid YAML ({problem})") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config is a mapping of sections ({', '.join(ALL_SECTIONS)}), "
                          f"got {_show(raw)}")
    return raw


def _parse_overrides(extra: list[str]) -> dict[str, Any]:
    if len(extra) % 2:
        raise ConfigError(f"overrides come in pairs --key value, got {extra}")
    out = {}
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        if not key.startswith("--"):
            raise ConfigError(f"expected --key, got {key!r}")
        try:
            out[key[2:].replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"{key} {value!r} is not a YAML value ({getattr(err, 'problem', err)})") from err
    return out


def _method(raw: dict) -> str:
    method = raw.get("method", "lora")
    if not isinstance(method, str):
        raise ConfigError(f"method must be a method name ({', '.join(registered_methods())}), got {_show(method)}")
    get_method(method)  # unknown names list the registered ones
    return method


def _section(raw: dict, name: str) -> dict:
    """A section's fields; None (an empty section) is {}; anything but a mapping is refused."""
    values = raw.get(name)
    if values is None:
        return {}
    if not isinstance(values, dict):
        example = {"model": "{name: minilm, task: classification}", "data": "{dataset: data.csv}",
                   "adapter": "{r: 8, alpha: 16}", "train": "{lr: 1.0e-3, max_steps: 100}"}[name]
        raise ConfigError(f"section {name!r} must be a mapping of fields like {example}, got {_show(values)}")
    return values


def _place(raw: dict, key: str, value: Any) -> None:
    """Put an override in its section: `train.lr`, or a bare field that only one section has."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in ALL_SECTIONS or section == "method":
            raise ConfigError(f"cannot place --{key}: no section {section!r}; sections: model, data, adapter, train")
        raw[section] = {**_section(raw, section), name: value}
        return
    if key == "method":
        raw["method"] = value
        return
    owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    adapter_fields = {f.name for f in dataclasses.fields(get_method(_method(raw)).config_cls)}
    owners += ["adapter"] if key in adapter_fields else []
    if len(owners) != 1:
        where = "no section has it" if not owners else f"it is in {owners}; write --{owners[0]}.{key}"
        raise ConfigError(f"cannot place --{key}: {where}")
    raw[owners[0]] = {**_section(raw, owners[0]), key: value}


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config and apply `--key value` overrides; every value is type-checked here.

    Raises:
        FileNotFoundError: no file at `path`.
        ConfigError: a YAML syntax error (file, line, column), an unknown section or field (the valid
            ones listed), a value of the wrong type, or one its config's validation refuses.
    """
    raw = _read_yaml(Path(path))
    _method(raw)
    for key, value in _parse_overrides(overrides or []).items():
        _place(raw, key, value)
    unknown = sorted(map(str, set(raw) - set(ALL_SECTIONS)))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; sections: {', '.join(ALL_SECTIONS)}")
    parts = {}
    for name, cls in SECTIONS.items():
        values = _section(raw, name)
        bad = sorted(map(str, set(values) - {f.name for f in dataclasses.fields(cls)}))
        if bad:
            raise ConfigError(f"unknown {name} field(s) {bad}; valid: {', '.join(field_docs(cls))}")
        parts[name] = cls(**typed_fields(cls, values, name))
    method = _method(raw)
    config_cls = get_method(method).config_cls
    adapter = typed_fields(config_cls, _section(raw, "adapter"), "adapter")
    config_cls.from_dict(adapter)  # validate now, not mid-run
    return RunConfig(method=method, adapter=adapter, **parts)


def config_help() -> str:
    """`peftkit train --help`: every section and field with its documentation."""
    lines = [__doc__.strip(), ""]
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        lines += [f"  {k}: {doc}" for k, doc in field_docs(cls).items()]
    lines.append("method: one of " + ", ".join(registered_methods()))
    lines.append("adapter: the method's fields:")
    for name, method in registered_methods().items():
        lines.append(f"  [{name}] ({method.config_cls.paper})")
        lines += [f"    {k}: {doc}" for k, doc in field_docs(method.config_cls).items()]
    return "\n".join(lines)
