"""A learnable toy task for the training-loop tests, also runnable as a script (subprocess, torchrun).

    python tests/train_toy.py OUT --steps 12 --save-every 4 [--grad-accum 2] [--dropout 0.1] [--sleep 0.1]
    torchrun --nproc_per_node 2 tests/train_toy.py OUT --steps 6 --batch-size 4

The script trains a LoRA MLP classifier and writes each rank's final adapter to OUT/rank<r>.safetensors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import peftkit  # noqa: E402
from peftkit.core.io import adapter_state_dict  # noqa: E402
from peftkit.train.loop import TrainConfig, train  # noqa: E402


class Classifier(nn.Module):
    """An MLP that returns {"loss", "logits"}, like a Hugging Face classification model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x, labels=None):
        logits = self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        return {"logits": logits, "loss": None if labels is None else F.cross_entropy(logits, labels)}


def toy_data(n: int, seed: int = 0) -> list[dict]:
    """Inputs x ~ N(0, I) with labels argmax(W x) for a fixed random W: learnable, not yet learned."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 16, generator=g)
    labels = (x @ w.T).argmax(-1)
    return [{"x": x[i], "labels": labels[i]} for i in range(n)]


def stack(batch: list[dict]) -> dict:
    """Collate for fixed-size examples."""
    return {k: torch.stack([item[k] for item in batch]) for k in batch[0]}


def base_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier()


def lora_classifier(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    model = base_classifier(seed)
    cfg = peftkit.LoRAConfig(r=4, alpha=8, dropout=dropout, targets=["fc1", "fc2"], modules_to_save=["head"])
    return peftkit.apply(model, cfg)


class Sleep:
    """Slows every step down so a parent process can kill the run at an arbitrary moment."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_after_backward(self, step, model, optimizer) -> None:
        time.sleep(self.seconds)


def toy_config(out, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out), lr=1e-2, batch_size=8, max_steps=12, save_every=4, eval_every=6,
                seed=3, progress=False, log_every=0, warmup_steps=2, weight_decay=0.01)
    return TrainConfig(**{**base, **overrides})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = lora_classifier(dropout=args.dropout)
    cfg = toy_config(args.out, max_steps=args.steps, save_every=args.save_every, batch_size=args.batch_size,
                     grad_accum=args.grad_accum)
    callbacks = [Sleep(args.sleep)] if args.sleep else []
    train(model, toy_data(64), toy_data(32, seed=1), cfg, stack, resume=args.resume, callbacks=callbacks)
    from safetensors.torch import save_file

    rank = int(os.environ.get("RANK", "0"))
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()},
              os.path.join(args.out, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
