"""Pretrain the shipped vision checkpoints on Fashion-MNIST: `python -m peftkit.train.vision_pretrain`.

    python -m peftkit.train.vision_pretrain                     # both models into peftkit/assets/vision
    python -m peftkit.train.vision_pretrain --models vit --out /tmp/vit --epochs 1

Needs Debian's `dataset-fashion-mnist` (`make pretrain-vision` installs it; see `images.py`). Each
model trains from a seeded init on the 55,000-image train split (validation: 5,000 held out of the
train file; test: the 10,000-image test file) with AdamW, a linear warm-up over the first 5% of the
steps and a cosine decay to 0, no augmentation. Data order is drawn from a generator seeded with
(seed, epoch); on the same machine and thread count (`--threads`) a rerun gives the same weights. The test and
validation accuracies, the settings and the command are written into the checkpoint's JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import images
from .vision import ASSETS, VisionClassifier, VisionConfig, build_vision_model

RECIPES = {
    "vit": {"config": VisionConfig(architecture="vit", patch_size=4, dim=96, depth=6, heads=3, mlp_ratio=2.0),
            "epochs": 3, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05},
    "cnn": {"config": VisionConfig(architecture="cnn", channels=[32, 64, 128]),
            "epochs": 3, "batch_size": 128, "lr": 3e-3, "weight_decay": 0.01},
}
"""Architecture -> (config, training settings) of the shipped checkpoints."""
TINY = {"vit": VisionConfig(architecture="vit", patch_size=7, dim=16, depth=2, heads=2),
        "cnn": VisionConfig(architecture="cnn", channels=[4, 8])}
"""Configs for smoke runs (tests): seconds, not minutes."""


@torch.no_grad()
def accuracy(model: VisionClassifier, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Share of images whose argmax logit is the label."""
    model.eval()
    correct = sum(int((model(pixel_values[i:i + batch_size]).logits.argmax(-1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(labels), batch_size))
    return correct / max(len(labels), 1)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier of the 0-based `step`: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(model: VisionClassifier, train: tuple[torch.Tensor, torch.Tensor], *, epochs: float, batch_size: int,
             lr: float, weight_decay: float, seed: int = 0, log_every: int = 100) -> dict:
    """Train every parameter of `model` on (pixel_values, labels); returns steps, final loss and time.

    Args:
        train: normalised images (N, 1, H, W) and labels (N,).
        epochs: passes over the data (fractions allowed).
        log_every: print the running loss every this many steps (0: never).
    """
    x, y = train
    per_epoch = math.ceil(len(y) / batch_size)
    total = max(1, round(epochs * per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, max(1, total // 20)))
    model.train()
    started, step, running = time.perf_counter(), 0, []
    while step < total:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + step // per_epoch))
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            loss = model(x[idx], labels=y[idx]).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            running.append(loss.item())
            step += 1
            if log_every and step % log_every == 0:
                print(f"step {step}/{total}  loss {sum(running[-log_every:]) / log_every:.4f}", flush=True)
            if step == total:
                break
    return {"steps": total, "final_loss": sum(running[-20:]) / len(running[-20:]),
            "train_time_s": round(time.perf_counter() - started, 1)}


def pretrain_and_save(arch: str, out: Path, *, seed: int = 0, epochs: float | None = None, tiny: bool = False,
                      train_size: int | None = None, eval_size: int | None = None) -> dict:
    """Pretrain one architecture on Fashion-MNIST, report accuracies and write the checkpoint to `out`."""
    recipe = dict(RECIPES[arch])
    config = replace(TINY[arch] if tiny else recipe.pop("config"), class_names=images.FASHION_MNIST_CLASSES)
    recipe.pop("config", None)
    recipe["epochs"] = epochs or recipe["epochs"]
    data = {s: images.image_dataset("fashion_mnist", s, n=train_size if s == "train" else eval_size)
            for s in images.SPLITS}
    torch.manual_seed(seed)  # the init is part of the recipe
    model = build_vision_model(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"{arch}: {params:,} parameters, {len(data['train'])} training images, {recipe}", flush=True)
    figures = pretrain(model, (data["train"].pixel_values, data["train"].labels), seed=seed, **recipe)
    for split in ("validation", "test"):
        figures[f"{split}_accuracy"] = accuracy(model, data[split].pixel_values, data[split].labels)
    print(f"{arch}: validation accuracy {figures['validation_accuracy']:.4f}, "
          f"test accuracy {figures['test_accuracy']:.4f}, {figures['train_time_s']} s", flush=True)
    metadata = {"dataset": "Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747), peftkit split: "
                           f"{len(data['train'])} train / {len(data['validation'])} validation / {len(data['test'])} test",
                "normalisation": {"mean": images.PIXEL_MEAN, "std": images.PIXEL_STD, "of": "pixels / 255"},
                "seed": seed, "parameters": params, **recipe, **figures, "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "command": "python -m peftkit.train.vision_pretrain " + " ".join(sys.argv[1:])}
    model.save_pretrained(out, metadata=metadata)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m peftkit.train.vision_pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit,cnn", help="comma-separated: vit, cnn")
    parser.add_argument("--out", type=Path, default=ASSETS, help="writes OUT/vit-fmnist and OUT/cnn-fmnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, help="override the recipe's epochs")
    parser.add_argument("--train-size", type=int, help="a seeded subset of the train split (smoke runs)")
    parser.add_argument("--eval-size", type=int, help="a seeded subset of validation and test (smoke runs)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs, for smoke runs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); recorded")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for arch in args.models.split(","):
        if arch not in RECIPES:
            parser.error(f"unknown model {arch!r}; choose from {', '.join(RECIPES)}")
        pretrain_and_save(arch, args.out / f"{arch}-fmnist", seed=args.seed, epochs=args.epochs, tiny=args.tiny,
                          train_size=args.train_size, eval_size=args.eval_size)


if __name__ == "__main__":
    main()
