"""`peftkit train`: load the model and data, adapt, train, test and save (the YAML side is `run_config.py`).

Data and settings are checked before the first step (labels against the head's classes, `max_length`
against the model's positions), so a bad row or value ends the run before it spends any time.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from ..core.apply import apply
from ..core.calibration import calibrate, needs_calibration
from ..core.config import ConfigError
from ..core.inject import head_module_names
from ..core.params import print_summary
from ..core.registry import get_method
from .data import CausalLMDataset, ClassificationDataset, collate
from .distributed import resolve_device
from .evaluation import autocast_for, to_device
from .images import DATASETS as IMAGE_DATASETS
from .images import image_dataset
from .loop import Dist, evaluate, micro_batches, train
from .models import TASK_FILE, head_size, load_model, max_positions
from .output_dir import check_fresh
from .records import DataError, read_records, source_of
from .run_config import (  # noqa: F401  (re-exported: `from peftkit.train.run import load_run_config` works)
    CLASSIFICATION_TASKS,
    SECTIONS,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    config_help,
    load_run_config,
    typed_fields,
)


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
    """Train / eval / test datasets for the run's task (test may be None), every record checked.

    Classification labels are checked against `model.num_labels` when it is set, and the eval and
    test sets against the training set's classes (its label names, or ids below its class count), so
    a label the head cannot have ends the run here, naming its file and row, not mid-training.
    """
    d = cfg.data
    if cfg.model.task == "image-classification":
        return build_image_datasets(cfg)
    train_records = read_records(d.dataset, "train")
    if d.eval_dataset:
        eval_records = read_records(d.eval_dataset)
    elif Path(d.dataset).is_file():
        if len(train_records) < 2:
            raise DataError(f"{d.dataset} holds {len(train_records)} record; holding out an evaluation split "
                            "needs at least 2 (or set data.eval_dataset)")
        cut = max(1, len(train_records) // 10)  # a single file: hold out its last 10%
        train_records, eval_records = train_records[:-cut], train_records[-cut:]
    else:
        eval_records = read_records(d.dataset, d.eval_split)
    test_records = read_records(d.dataset, d.test_split) if d.test_split and not Path(d.dataset).is_file() else None
    if cfg.model.task == "classification":
        make = partial(ClassificationDataset, tokenizer=tokenizer, text_field=d.text_field,
                       label_field=d.label_field, max_length=d.max_length)
        train_ds = make(train_records, n=d.train_size, num_labels=cfg.model.num_labels)
        if train_ds.num_labels < 2:
            raise DataError(f"{source_of(train_records)}: every training label is {train_ds.labels[0]!r}; "
                            "classification needs two or more classes (or set model.num_labels)")
        make = partial(make, label_to_id=train_ds.label_to_id, num_labels=train_ds.num_labels)
    else:
        mode = "records" if d.prompt_field else "blocks"
        make = partial(_lm_dataset, tokenizer=tokenizer, text_field=d.text_field, block_size=d.max_length,
                       mode=mode, prompt_field=d.prompt_field)
        train_ds = make(train_records, n=d.train_size)
    return {"train": train_ds, "eval": make(eval_records, n=d.eval_size),
            "test": make(test_records, n=d.test_size) if test_records else None}


def _lm_dataset(records: list[dict], **kwargs) -> CausalLMDataset:
    dataset = CausalLMDataset(records, **kwargs)
    if not len(dataset):
        raise DataError(f"{source_of(records)} is shorter than one block of data.max_length="
                        f"{kwargs['block_size']} tokens; lower max_length or add text")
    return dataset


def check_max_length(cfg: RunConfig, model, tokenizer) -> None:
    """Refuse a `max_length` the model cannot read (an index error deep in its embeddings otherwise)."""
    limit = max_positions(model, tokenizer)
    if limit is not None and cfg.data.max_length > limit[0]:
        raise ConfigError(f"data.max_length={cfg.data.max_length} is more than {cfg.model.name} can read "
                          f"({limit[0]} positions, from {limit[1]}); set data.max_length <= {limit[0]}")


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


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Load, adapt, train, test and save; returns metrics (also in output_dir/metrics.json).

    `resume` continues the run in `output_dir`; `overwrite` (or `train.overwrite`) lets a fresh run
    replace another run's files there. Without either, a used output_dir is refused before the model
    is loaded (and again, under its lock, by `train`).
    """
    import torch

    overwrite = overwrite or cfg.train.overwrite
    check_fresh(cfg.train.output_dir, resume, overwrite)  # fail in a second, not after loading the model
    torch.manual_seed(cfg.train.seed)  # a fresh head and the adapter's init are part of the run: reproducible
    model, data, collate_fn = _model_and_data(cfg)
    testing = data["test"] is not None and int(os.environ.get("RANK", "0")) == 0
    before = _test(model, data["test"], collate_fn, cfg, "before") if testing and cfg.data.test_before_training else None
    apply(model, calibrated(adapter_config(cfg, model), model, data["train"], collate_fn, cfg))
    print_summary(model, max_rows=12)
    metrics = train(model, data["train"], data["eval"], cfg.train, collate_fn, resume=resume, overwrite=overwrite)
    if testing:
        metrics["test"] = _test(model, data["test"], collate_fn, cfg, "after")
        metrics["test_before"] = before or {}
    save_task_info(cfg, task_info(cfg, data), metrics)
    return metrics


def _model_and_data(cfg: RunConfig) -> tuple[Any, dict[str, Any], Any]:
    """The model, its datasets and the collate function of the run's task."""
    if cfg.model.task == "image-classification":
        from torch.utils.data import default_collate

        data = build_image_datasets(cfg)  # images need no tokenizer, so the head is sized from the data at once
        _check_image_labels(cfg, data)
        model, _ = load_model(cfg.model.name, cfg.model.task, num_labels=cfg.model.num_labels or data["train"].num_labels)
        return model, data, default_collate
    model, tokenizer = load_model(cfg.model.name, cfg.model.task, num_labels=cfg.model.num_labels)
    check_max_length(cfg, model, tokenizer)
    data = build_datasets(cfg, tokenizer)
    if cfg.model.task == "classification" and data["train"].num_labels != head_size(model):
        model, tokenizer = load_model(cfg.model.name, cfg.model.task, num_labels=data["train"].num_labels)
    return model, data, partial(collate, pad_id=tokenizer.pad_token_id)


def _check_image_labels(cfg: RunConfig, data: dict[str, Any]) -> None:
    classes = data["train"].num_labels
    if cfg.model.num_labels is not None and classes > cfg.model.num_labels:
        raise DataError(f"{cfg.data.dataset} has {classes} classes, more than model.num_labels="
                        f"{cfg.model.num_labels}; raise it or leave it unset")


def task_info(cfg: RunConfig, data: dict[str, Any]) -> dict[str, Any]:
    """What the adapter was trained for: the task, the head's classes and their names in id order."""
    train_ds = data["train"]
    if cfg.model.task not in CLASSIFICATION_TASKS:
        return {"task": cfg.model.task, "num_labels": None, "label_names": None}
    return {"task": cfg.model.task, "num_labels": train_ds.num_labels,
            "label_names": getattr(train_ds, "label_names", None)}


def save_task_info(cfg: RunConfig, info: dict[str, Any], metrics: dict) -> None:
    """`task.json` next to the final adapter, and the same figures in metrics.json (rank 0 only).

    Why: a run on string labels maps them to ids by sorted name; without the names saved, its
    predictions cannot be mapped back, and `peftkit merge/export` could not tell a classifier's task.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out = Path(cfg.train.output_dir)
    if (out / "adapter").is_dir():
        (out / "adapter" / TASK_FILE).write_text(json.dumps(info, indent=1))
    metrics.update(info)
    if out.is_dir():
        (out / "metrics.json.tmp").write_text(json.dumps(metrics, indent=1))
        os.replace(out / "metrics.json.tmp", out / "metrics.json")


def _test(model, data, collate_fn, cfg: RunConfig, when: str) -> dict[str, float]:
    device = next(model.parameters()).device
    figures = evaluate(model, data, collate_fn, cfg.train, Dist(0, 1, device, False))
    print(f"test ({when} training): " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    return figures
