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
For classification, the fresh head is trained with every method that does not train the head itself
(it is added to `modules_to_save` unless the config names modules itself): a random head cannot be
left frozen. Methods that need task data before `apply` (SPT's plan, LoFiT's head choice with
`top_k`) are calibrated on the first training batches (`peftkit.calibrate`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from ..core.apply import apply
from ..core.calibration import calibrate, needs_calibration
from ..core.config import ConfigError, coerce_numbers, field_docs
from ..core.inject import head_module_names
from ..core.params import print_summary
from ..core.registry import get_method, registered_methods
from .data import CausalLMDataset, ClassificationDataset, collate, read_records
from .distributed import resolve_device
from .evaluation import autocast_for, to_device
from .images import DATASETS as IMAGE_DATASETS
from .images import image_dataset
from .loop import Dist, TrainConfig, evaluate, micro_batches, train
from .models import load_model

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
    """Field holding the class label (classification)."""

    prompt_field: str | None = None
    """Causal LM on records: a prompt field whose tokens get no loss (instruction tuning)."""

    max_length: int = 128
    """Truncation length (classification) or block size (causal LM)."""

    train_size: int | None = None
    """Train on this many examples (a fixed seeded subset); None uses all."""

    eval_size: int | None = None
    """Evaluate on this many examples; None uses all."""

    test_size: int | None = None
    """Test on this many examples; None uses all."""

    test_before_training: bool = False
    """Also evaluate the test split before the adapter is applied (held-out loss before and after)."""


@dataclass
class RunConfig:
    """One run: model, data, method and its adapter fields, and the loop's settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: str = "lora"
    adapter: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _parse_overrides(extra: list[str]) -> dict[str, Any]:
    if len(extra) % 2:
        raise ConfigError(f"overrides come in pairs --key value, got {extra}")
    out = {}
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        if not key.startswith("--"):
            raise ConfigError(f"expected --key, got {key!r}")
        out[key[2:].replace("-", "_")] = yaml.safe_load(value)
    return out


def _place(raw: dict, key: str, value: Any) -> None:
    """Put an override in its section: `train.lr`, or a bare field that only one section has."""
    if "." in key:
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
        return
    if key == "method":
        raw["method"] = value
        return
    owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    adapter_fields = {f.name for f in dataclasses.fields(get_method(raw.get("method", "lora")).config_cls)}
    owners += ["adapter"] if key in adapter_fields else []
    if len(owners) != 1:
        where = "no section has it" if not owners else f"it is in {owners}; write --{owners[0]}.{key}"
        raise ConfigError(f"cannot place --{key}: {where}")
    raw.setdefault(owners[0], {})[key] = value


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config and apply `--key value` overrides."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    for key, value in _parse_overrides(overrides or []).items():
        _place(raw, key, value)
    unknown = sorted(set(raw) - {"model", "data", "method", "adapter", "train"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; sections: model, data, method, adapter, train")
    parts = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        bad = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if bad:
            raise ConfigError(f"unknown {name} field(s) {bad}; valid: {', '.join(field_docs(cls))}")
        parts[name] = cls(**coerce_numbers(cls, values))
    method = raw.get("method", "lora")
    get_method(method).config_cls.from_dict(raw.get("adapter") or {})  # validate now, not mid-run
    return RunConfig(method=method, adapter=raw.get("adapter") or {}, **parts)


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


def build_image_datasets(cfg: RunConfig) -> dict[str, Any]:
    """Train / eval / test image datasets (test may be None) of a built-in image set."""
    d = cfg.data
    if d.dataset not in IMAGE_DATASETS or d.eval_dataset:
        raise ConfigError(f"image-classification reads the built-in image sets {', '.join(IMAGE_DATASETS)} "
                          f"(no eval_dataset); got dataset={d.dataset!r}, eval_dataset={d.eval_dataset!r}")
    return {"train": image_dataset(d.dataset, "train", n=d.train_size),
            "eval": image_dataset(d.dataset, d.eval_split, n=d.eval_size),
            "test": image_dataset(d.dataset, d.test_split, n=d.test_size) if d.test_split else None}


def build_datasets(cfg: RunConfig, tokenizer) -> dict[str, Any]:
    """Train / eval / test datasets for the run's task (test may be None)."""
    d = cfg.data
    if cfg.model.task == "image-classification":
        return build_image_datasets(cfg)
    train_records = read_records(d.dataset, "train")
    if d.eval_dataset:
        eval_records = read_records(d.eval_dataset)
    elif Path(d.dataset).is_file():
        cut = max(1, len(train_records) // 10)  # a single file: hold out its last 10%
        train_records, eval_records = train_records[:-cut], train_records[-cut:]
    else:
        eval_records = read_records(d.dataset, d.eval_split)
    test_records = read_records(d.dataset, d.test_split) if d.test_split and not Path(d.dataset).is_file() else None
    if cfg.model.task == "classification":
        make = partial(ClassificationDataset, tokenizer=tokenizer, text_field=d.text_field,
                       label_field=d.label_field, max_length=d.max_length)
        train_ds = make(train_records, n=d.train_size)
        make = partial(make, label_to_id=train_ds.label_to_id)
    else:
        mode = "records" if d.prompt_field else "blocks"
        make = partial(CausalLMDataset, tokenizer=tokenizer, text_field=d.text_field, block_size=d.max_length,
                       mode=mode, prompt_field=d.prompt_field)
        train_ds = make(train_records, n=d.train_size)
    return {"train": train_ds, "eval": make(eval_records, n=d.eval_size),
            "test": make(test_records, n=d.test_size) if test_records else None}


def adapter_config(cfg: RunConfig, model) -> Any:
    """The method config, with the classification head trained where the user did not say otherwise."""
    fields = dict(cfg.adapter)
    config_cls = get_method(cfg.method).config_cls
    if cfg.model.task in CLASSIFICATION_TASKS and not config_cls.trains_head and "modules_to_save" not in fields:
        fields["modules_to_save"] = sorted(n.split(".")[-1] for n in head_module_names(model))
    return config_cls.from_dict(fields)


def calibrated(adapter_cfg: Any, model, train_data, collate_fn, cfg: RunConfig) -> Any:
    """The config after the method's calibration on the first training batches (most methods have none).

    The batches are the loop's first ones (same seed and order) on the training device; every rank
    calibrates on rank 0's batches, so a deterministic calibration gives every rank the same adapter.
    """
    if not needs_calibration(adapter_cfg):
        return adapter_cfg
    device = resolve_device(cfg.train.device)  # not setup_distributed: the loop joins the process group
    model.to(device)
    batches = (to_device(b, device) for b in micro_batches(train_data, collate_fn, cfg.train, 0, Dist(0, 1, device, False)))
    print(f"calibrating {adapter_cfg.method} on training batches of {cfg.train.batch_size}", flush=True)
    with autocast_for(cfg.train, device):
        return calibrate(model, adapter_cfg, batches)


def run(cfg: RunConfig, *, resume: bool = False) -> dict:
    """Load, adapt, train, test and save; returns metrics (also in output_dir/metrics.json)."""
    import torch

    torch.manual_seed(cfg.train.seed)  # a fresh head and the adapter's init are part of the run: reproducible
    model, data, collate_fn = _model_and_data(cfg)
    testing = data["test"] is not None and int(os.environ.get("RANK", "0")) == 0
    before = _test(model, data["test"], collate_fn, cfg, "before") if testing and cfg.data.test_before_training else None
    apply(model, calibrated(adapter_config(cfg, model), model, data["train"], collate_fn, cfg))
    print_summary(model, max_rows=12)
    metrics = train(model, data["train"], data["eval"], cfg.train, collate_fn, resume=resume)
    if testing:
        metrics["test"] = _test(model, data["test"], collate_fn, cfg, "after")
        metrics["test_before"] = before or {}
        out = Path(cfg.train.output_dir)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _model_and_data(cfg: RunConfig) -> tuple[Any, dict[str, Any], Any]:
    """The model, its datasets and the collate function of the run's task."""
    if cfg.model.task == "image-classification":
        from torch.utils.data import default_collate

        data = build_image_datasets(cfg)  # images need no tokenizer, so the head is sized from the data at once
        model, _ = load_model(cfg.model.name, cfg.model.task, num_labels=cfg.model.num_labels or data["train"].num_labels)
        return model, data, default_collate
    model, tokenizer = load_model(cfg.model.name, cfg.model.task, num_labels=cfg.model.num_labels or 2)
    data = build_datasets(cfg, tokenizer)
    if cfg.model.task == "classification" and data["train"].num_labels != (cfg.model.num_labels or 2):
        model, tokenizer = load_model(cfg.model.name, cfg.model.task, num_labels=data["train"].num_labels)
    return model, data, partial(collate, pad_id=tokenizer.pad_token_id)


def _test(model, data, collate_fn, cfg: RunConfig, when: str) -> dict[str, float]:
    device = next(model.parameters()).device
    figures = evaluate(model, data, collate_fn, cfg.train, Dist(0, 1, device, False))
    print(f"test ({when} training): " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    return figures
