"""PETALface on the vision demo: two LoRAs mixed per image by a quality score alpha from outside the model.

PETALface (Narayan et al., WACV 2025; code Kartik-3004/PETALface `backbones/lora_layers.py`, methods.md
§2.12) puts two LoRAs on every adapted linear layer, one for low- and one for high-quality images, and
mixes them by a per-image quality score alpha in [0, 1] that a separate IQA network computes:

    y_i = W0 x_i + (1 - alpha_i) B1 A1 x_i + alpha_i B2 A2 x_i        (LoRA_low = 1, LoRA_high = 2)

peftkit needs no new layer for it: two named LoRAs ("low", "high") and a mixed batch,
`model(..., adapter_names=[("low", "high")] * B, adapter_weights=[(1 - a, a) for a in alphas])`
(core/routing.py), train both jointly with the per-sample alpha.

The proxy task here: the project's ViT (pretrained on Fashion-MNIST) adapted to MNIST-5k, with a
Gaussian blur on part of the images standing in for low quality. The blur level is known, so alpha
comes from it (no IQA network):

    sigma_i = level_i * SIGMA_MAX,      alpha_i = 1 - level_i        (sharp: level 0, alpha 1)

The classifier head is fresh and shared by both LoRAs; it trains in place, outside either adapter (a
mixed batch refuses an adapter that trains base weights, such as one with modules_to_save).
Training is peftkit's own loop (`loop.train`): the collate function puts `adapter_names` and
`adapter_weights` into every batch, and the loop passes the batch to the model as keyword arguments.
`benchmarks/petalface_demo.py` runs the comparison.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from ..core.adapters import set_active
from ..core.apply import apply
from ..methods.lora import LoRAConfig
from .demo import VIT_LINEAR
from .images import image_split
from .loop import TrainConfig, train
from .vision import load_vision_model

LOW, HIGH = "low", "high"
"""Adapter names: LoRA_low (weight 1 - alpha) and LoRA_high (weight alpha)."""
SIGMA_MAX = 2.5
"""Blur standard deviation, in pixels of the 28x28 image, at blur level 1."""


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    """1-D Gaussian of 2 radius + 1 taps, summing to 1; sigma 0 gives the identity (a 1 at the centre)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = (x == 0).float() if sigma <= 0 else torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def blur(images: torch.Tensor, levels: torch.Tensor, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Each image (N, C, H, W) blurred with sigma = levels[i] * sigma_max (separable, edge pixels repeated).

    Why repeat the edges, not pad with 0: with a kernel that sums to 1, blurring then commutes with the
    affine pixel normalisation, so blurring normalised images equals normalising blurred ones.
    """
    radius = math.ceil(3 * sigma_max)
    n, c, h, w = images.shape
    taps = torch.stack([gaussian_kernel(float(s) * sigma_max, radius) for s in levels])  # (N, 2 radius + 1)
    taps = taps.repeat_interleave(c, dim=0).to(images)  # (N C, taps): one kernel per image channel
    x = F.pad(images.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")  # (1, N C, H + 2r, W + 2r)
    x = F.conv2d(x, taps[:, None, None, :], groups=n * c)  # along the width: (1, N C, H + 2r, W)
    x = F.conv2d(x, taps[:, None, :, None], groups=n * c)  # along the height: (1, N C, H, W)
    return x.reshape(n, c, h, w)


def blur_levels(n: int, blurred_fraction: float = 0.5, lowest: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Blur level per image: 0 (sharp), or for a seeded `blurred_fraction` of them uniform in [lowest, 1]."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.zeros(n)
    chosen = torch.randperm(n, generator=g)[: round(blurred_fraction * n)]
    levels[chosen] = lowest + (1 - lowest) * torch.rand(len(chosen), generator=g)
    return levels


class QualityDataset(Dataset):
    """Images, labels and the quality score alpha = 1 - blur level: items {"pixel_values", "labels", "alpha"}."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, levels: torch.Tensor) -> None:
        self.pixel_values = blur(pixel_values, levels)
        self.labels, self.alpha = labels.long(), 1.0 - levels
        self.blurred = levels > 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i], "alpha": self.alpha[i]}


def quality_split(split: str, blurred_fraction: float = 0.5, lowest: float = 0.5, seed: int = 0,
                  dataset: str = "mnist_5k") -> QualityDataset:
    """A split of a built-in image set with a seeded part of it blurred (`blur_levels`)."""
    pixel_values, labels = image_split(dataset, split)
    return QualityDataset(pixel_values, labels, blur_levels(len(labels), blurred_fraction, lowest, seed))


def mixture_collate(items: list[dict], names: Sequence[str] | None = (LOW, HIGH),
                    alpha: float | None = None) -> dict:
    """A batch for the model: each sample's mixture (1 - alpha_i) LoRA_low + alpha_i LoRA_high.

    `names=None` drops alpha (a model with one adapter); `alpha` set overrides every sample's score
    (0: LoRA_low alone, 1: LoRA_high alone).
    """
    batch = default_collate(items)
    scores = batch.pop("alpha").tolist()
    if names is None:
        return batch
    scores = scores if alpha is None else [alpha] * len(scores)
    return {**batch, "adapter_names": [tuple(names)] * len(scores),
            "adapter_weights": [(1.0 - a, a) for a in scores]}


def add_loras(model: nn.Module, two_loras: bool, r: int = 8, lora_alpha: float = 16.0) -> nn.Module:
    """One LoRA, or PETALface's two (LOW, HIGH, both active and trainable), on the ViT's linear layers.

    The head (`model.head`) trains too, shared by both LoRAs and outside either adapter (module docstring).
    """
    config = LoRAConfig(r=r, alpha=lora_alpha, targets=VIT_LINEAR)
    if two_loras:
        apply(model, config, name=LOW)
        apply(model, config, name=HIGH)
        set_active(model, [LOW, HIGH])
    else:
        apply(model, config)
    model.head.requires_grad_(True)
    return model


def build_model(two_loras: bool, r: int = 8, lora_alpha: float = 16.0, seed: int = 0) -> nn.Module:
    """The demo's ViT (vit-fmnist) with a fresh 10-class head and `add_loras`."""
    torch.manual_seed(seed)  # the fresh head and the LoRA inits are part of the run
    return add_loras(load_vision_model("vit-fmnist", num_classes=10), two_loras, r, lora_alpha)


def train_adapters(model: nn.Module, data: Dataset, collate: Callable, steps: int, batch_size: int, lr: float,
                   seed: int = 0, warmup_ratio: float = 0.1, max_grad_norm: float = 1.0, progress: bool = True,
                   output_dir: str | os.PathLike | None = None) -> dict:
    """Train the model's trainable parameters with peftkit's loop; returns time, final loss and trainable count.

    The vision demo's recipe: AdamW (no weight decay), linear warm-up over `warmup_ratio` of the steps
    then linear decay to 0, gradients clipped to norm `max_grad_norm`. The loop writes metrics.json and
    loss.png to `output_dir` (a temporary directory when None); no adapter is saved.
    """
    with tempfile.TemporaryDirectory() as scratch:
        cfg = TrainConfig(output_dir=str(output_dir or scratch), lr=lr, max_steps=steps, batch_size=batch_size,
                          warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, seed=seed, log_every=0,
                          progress=progress, save_adapter=False, overwrite=True)
        metrics = train(model, data, None, cfg, collate)
    model.eval()
    tail = [record["loss"] for record in metrics["train_loss"][-10:]]
    return {"time_s": metrics["final"]["time_s"], "final_loss": sum(tail) / max(1, len(tail)),
            "trainable_params": metrics["final"]["trainable_params"]}


@torch.no_grad()
def evaluate_quality(model: nn.Module, data: QualityDataset, collate: Callable, batch_size: int = 500) -> dict:
    """Accuracy on all of `data`, on its sharp images and on its blurred ones."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(data), dtype=torch.bool)
    for start in range(0, len(data), batch_size):
        rows = range(start, min(start + batch_size, len(data)))
        batch = collate([data[i] for i in rows])
        labels = batch.pop("labels")
        correct[start : start + len(rows)] = model(**batch).logits.argmax(-1) == labels
    model.train(was_training)
    blurred = data.blurred
    return {"accuracy": correct.float().mean().item(), "accuracy_sharp": correct[~blurred].float().mean().item(),
            "accuracy_blurred": correct[blurred].float().mean().item(),
            "n_sharp": int((~blurred).sum()), "n_blurred": int(blurred.sum())}
