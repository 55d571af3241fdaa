"""Checkpoints a killed run resumes from: tensors in safetensors, everything else in JSON, never pickle.

Layout of a run's `output_dir`:

    checkpoint-000040/
        peftkit_adapter.json   adapter config and base fingerprint } a plain peftkit adapter directory:
        adapter.safetensors    adapter weights                     } `peftkit.load(base, ".../checkpoint-last")`
        optimizer.safetensors  per-parameter optimizer tensors, "<param index>.<name>" ("0.exp_avg", ...)
        rng.safetensors        torch CPU (and CUDA) generator states, one row per rank
        schedule.safetensors   the method schedule's tensors (AdaLoRA's importance EMAs), when it has one
        trainer_state.json     step, data position, optimizer hyperparameters and scalar state,
                               scheduler state, the method schedule's counters, Python and NumPy RNG,
                               loss and eval history
    checkpoint-last -> checkpoint-000040

A checkpoint is written into a hidden temporary directory, every file is fsynced, the directory is
renamed into place, and only then is `checkpoint-last` re-pointed (a new symlink renamed over the old
one). A kill at any moment therefore leaves `checkpoint-last` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from ..core.io import load_adapter_state_dict, read_adapter, read_tensors, save

LAST = "checkpoint-last"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
SCHEDULE_FILE = "schedule.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not fit the run that tries to resume from it."""


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"checkpoint-{step:06d}"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `checkpoint-last` points at, or None when the run has none yet."""
    link = Path(output_dir) / LAST
    return link.resolve() if link.is_symlink() and (link.resolve() / STATE_FILE).is_file() else None


# --- optimizer state <-> (tensors, JSON) -----------------------------------------------------
def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into safetensors-ready tensors and JSON-ready values."""
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            elif value is None or isinstance(value, bool | int | float | str):
                scalars[key] = value
            else:
                raise CheckpointError(
                    f"optimizer state {name!r} of parameter {index} is a {type(value).__name__}; only "
                    "tensors and plain numbers can be checkpointed without pickle"
                )
    for group in state_dict["param_groups"]:
        bad = [k for k, v in group.items() if isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"optimizer hyperparameters {bad} are tensors; use plain numbers")
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, template: dict) -> dict:
    """Inverse of `flatten_optimizer`; `template` (the live optimizer's state dict) restores tuples."""
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for saved, live in zip(meta["param_groups"], template["param_groups"], strict=True):
        # JSON turned tuples such as AdamW's betas into lists; give them back their type.
        groups.append({k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


# --- a method schedule's state <-> (tensors, JSON) -------------------------------------------
def split_schedule_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """`MethodSchedule.state_dict()` as safetensors-ready tensors and JSON-ready values."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if k not in tensors}
    try:
        json.dumps(rest)
    except TypeError as err:
        raise CheckpointError(f"the method schedule's state holds values that are neither tensors nor JSON ({err}); "
                              "its state_dict must return only those") from err
    return tensors, rest


# --- random number generators -----------------------------------------------------------------
def capture_rng(world_size: int, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Every rank's torch generator states (a collective: all ranks call it) and this rank's others."""
    tensors = {"torch": _gather(torch.get_rng_state(), world_size, device)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = _gather(torch.cuda.get_rng_state(), world_size, device)
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict, rank: int) -> None:
    """Set the generators to the states `capture_rng` saved (this rank's row)."""
    rows = tensors["torch"]
    torch.set_rng_state(rows[rank % len(rows)].clone())
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"][rank % len(tensors["cuda"])].clone())
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _gather(state: torch.Tensor, world_size: int, device: torch.device) -> torch.Tensor:
    """(world_size, n) rows of every rank's generator state; gathered as tensors, not pickled objects."""
    if world_size == 1:
        return state.unsqueeze(0)
    rows = [torch.empty_like(state, device=device) for _ in range(world_size)]
    dist.all_gather(rows, state.to(device))
    return torch.stack(rows).cpu()


# --- writing and reading ----------------------------------------------------------------------
def save_checkpoint(output_dir: str | os.PathLike, step: int, model: nn.Module, optimizer, scheduler,
                    state: dict, rng: tuple[dict, dict], keep: int = 2, method_schedule=None) -> Path:
    """Write a complete checkpoint atomically, point `checkpoint-last` at it and prune old ones.

    `state` is the JSON part the loop owns (step, data position, history); `rng` comes from
    `capture_rng`; `method_schedule` is the model's MethodSchedule (rank budgets), if any.
    Call on one rank only. Returns the checkpoint directory.
    """
    output_dir = Path(output_dir)
    final = output_dir / checkpoint_name(step)
    tmp = output_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tmp)  # adapter weights + config: the directory is also a loadable adapter
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
    save_file(rng[0], str(tmp / RNG_FILE), metadata={"format": "pt"})
    meta = {**state, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng[1]}
    if method_schedule is not None:
        schedule_tensors, meta["method_schedule"] = split_schedule_state(method_schedule.state_dict())
        save_file(schedule_tensors, str(tmp / SCHEDULE_FILE), metadata={"format": "pt"})
    (tmp / STATE_FILE).write_text(json.dumps(meta))
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)
    if final.exists():  # left by an earlier run that was resumed from an older checkpoint
        shutil.rmtree(final)
    os.rename(tmp, final)
    link = output_dir / f".tmp-{LAST}-{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(final.name, link)
    os.replace(link, output_dir / LAST)
    _fsync(output_dir)
    _prune(output_dir, keep, final)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, scheduler, rank: int,
                    method_schedule=None) -> dict:
    """Load adapter, optimizer, scheduler, method schedule and RNG states; returns the JSON state."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    meta = json.loads((path / STATE_FILE).read_text())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if meta["trainable"] != trainable:
        raise CheckpointError(
            f"{path} was saved from a model with other trainable parameters "
            f"({len(meta['trainable'])} saved, {len(trainable)} now); resume with the same adapter config"
        )
    load_adapter_state_dict(model, read_adapter(path)[2])  # the adapter as peftkit.save wrote it
    template = optimizer.state_dict()
    optimizer.load_state_dict(unflatten_optimizer(read_tensors(path / OPTIMIZER_FILE), meta["optimizer"], template))
    scheduler.load_state_dict(meta["scheduler"])
    if method_schedule is not None:
        if "method_schedule" not in meta:
            raise CheckpointError(f"{path} holds no state of the method's schedule (written by a run without it); "
                                  "resume with the adapter config it was trained with")
        method_schedule.load_state_dict({**meta["method_schedule"], **read_tensors(path / SCHEDULE_FILE)})
    restore_rng(read_tensors(path / RNG_FILE), meta["rng"], rank)
    return meta


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(output_dir: Path, keep: int, newest: Path) -> None:
    """Delete all but the `keep` newest checkpoints, and temporary directories a kill left behind."""
    for stale in output_dir.glob(".tmp-checkpoint-*"):
        if stale.is_symlink():
            stale.unlink()
        elif not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    done = sorted((p for p in output_dir.glob("checkpoint-[0-9]*") if p.is_dir()), key=lambda p: int(p.name[11:]))
    for old in done[: max(len(done) - keep, 0)]:
        if old != newest:
            shutil.rmtree(old)
