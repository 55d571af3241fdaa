"""Distributed pieces of the loop: where this process sits, and the one collective it needs.

peftkit does not wrap the model in DDP (the model stays the user's): the loop all-reduces the
trainable (adapter) gradients itself, so frozen base weights are never communicated, and shards the
data with a deterministic (seed, epoch) order like DistributedSampler.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    """Where this process sits in the run."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device of this process: "auto" is cuda:LOCAL_RANK when a GPU is present, else cpu."""
    if device == "auto":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, LOCAL_RANK); a single process otherwise."""
    dev = resolve_device(device)
    owns = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if owns:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), dev, owns)
    return Dist(0, 1, dev, False)


def all_reduce_gradients(params: Sequence[nn.Parameter], world_size: int) -> int:
    """Average the gradients of `params` over ranks, one message per dtype; returns the values sent.

    The loop passes only the trainable (adapter) parameters: frozen base weights are never
    communicated. A parameter without a gradient on this rank contributes zeros; one that no rank
    computed a gradient for keeps `grad = None`, so optimizers skip it as in a single process
    (IncreLoRA's not-yet-grown triplets). One flag per parameter rides along in the same message.
    """
    if world_size == 1:
        return 0
    sent = 0
    for dtype in sorted({p.dtype for p in params}, key=str):
        group = [p for p in params if p.dtype == dtype]
        has_grad = torch.tensor([float(p.grad is not None) for p in group], dtype=dtype, device=group[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
                         + [has_grad])
        dist.all_reduce(flat)  # one flat buffer instead of one call per tensor
        flat /= world_size
        grads = flat[: -len(group)].split([p.numel() for p in group])
        for p, grad, flag in zip(group, grads, flat[-len(group):].tolist(), strict=True):
            p.grad = grad.view_as(p) if flag > 0 else None
        sent += flat.numel()
    return sent


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) of `epoch`; a function of (seed, epoch).

    Like DistributedSampler: one permutation shared by all ranks, wrapped around to a multiple of the
    world size, and rank r takes every world-th index, so shards are disjoint and equally long.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    order += order[: (-n) % world]
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
