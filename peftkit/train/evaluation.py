"""Evaluation: example-weighted loss plus pluggable metrics, summed over batches and ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import TrainConfig
from .distributed import Dist


def accuracy(output, batch: dict) -> dict[str, tuple[float, float]]:
    """Default metric: {"accuracy": (correct, count)} for (batch, classes) logits and class-id labels.

    A metric function returns {name: (numerator, denominator)}; the loop sums both over batches and
    ranks and reports numerator / denominator. It returns {} when the task is not classification.
    """
    logits, labels = _field(output, "logits"), batch.get("labels")
    if logits is None or labels is None or logits.dim() != 2 or labels.shape != logits.shape[:1]:
        return {}
    if labels.is_floating_point():
        return {}
    return {"accuracy": (float((logits.argmax(-1) == labels).sum()), float(labels.numel()))}


def _field(output, name: str):
    return output.get(name) if isinstance(output, dict) else getattr(output, name, None)


def loss_of(output) -> torch.Tensor:
    """The scalar loss of a model output (an object with .loss, or a dict with "loss")."""
    loss = _field(output, "loss")
    if loss is None:
        raise TypeError(
            f"the model returned {type(output).__name__} without a loss: put the targets in the batch "
            "(labels=...) or wrap the model so that it returns an object with .loss"
        )
    return loss


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch's tensors to `device`."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, data, collate_fn: Callable, cfg: TrainConfig, run: Dist,
             metric_fn: Callable = accuracy) -> dict[str, float]:
    """Example-weighted eval loss and the metric function's figures over (at most eval_batches of) `data`."""
    size = cfg.eval_batch_size or cfg.batch_size
    batches = [list(range(i, min(i + size, len(data)))) for i in range(0, len(data), size)][: cfg.eval_batches]
    sharded = len(batches) >= run.world  # fewer batches than ranks: every rank evaluates all of them
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    for idx in batches[run.rank :: run.world] if sharded else batches:
        batch = to_device(collate_fn([data[i] for i in idx]), run.device)
        with autocast_for(cfg, run.device):
            output = model(**batch)
        figures = {"loss": (float(loss_of(output)) * len(idx), float(len(idx))), **metric_fn(output, batch)}
        for name, (num, den) in figures.items():
            total = sums.setdefault(name, [0.0, 0.0])
            total[0], total[1] = total[0] + num, total[1] + den
    model.train(was_training)
    names = sorted(sums)
    values = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=run.device).reshape(-1, 2)
    if sharded and run.world > 1:
        dist.all_reduce(values)
    return {k: (num / den if den else float("nan")) for k, (num, den) in zip(names, values.tolist(), strict=True)}


def autocast_for(cfg: TrainConfig, device: torch.device):
    on = cfg.bf16 is True or (cfg.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)
