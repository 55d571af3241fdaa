"""Checkpoints a killed run resumes from: tensors in safetensors, everything else in JSON, never pickle.

Layout of a run's `output_dir`:

    checkpoint-000040/
        peftkit_adapter.json   adapter config and base fingerprint } a plain peftkit adapter directory:
        adapter.safetensors    adapter weights                     } `peftkit.load(base, ".../checkpoint-last")`
        optimizer.safetensors  per-parameter optimizer tensors, "<param index>.<name>" ("0.exp_avg", ...)
        rng.safetensors        torch CPU (and CUDA) generator states, one row per rank
        schedule.safetensors   the method schedule's tensors (AdaLoRA's importance EMAs), when it has one
        training_schedule.safetensors  the training schedule's tensors (LISA's / IST's generator, IST's
                               scores), when the run has one
        trainer_state.json     step, data position, optimizer hyperparameters and scalar state,
                               the schedules' counters and active sets (keys "method_schedule",
                               "training_schedule"), Python and NumPy RNG, loss and eval history,
                               and the run's TrainConfig (compared when a run resumes)

Optimizer state is whatever `state_dict()` holds, as long as it is tensors and plain numbers: GaLore's
projection matrices and MeZO's seed stream, step count and (seed, g) records go through as they are.
A checkpoint written before training schedules existed has no "training_schedule" key and still reads.
    checkpoint-last -> checkpoint-000040

A checkpoint is written into a hidden temporary directory, every file is fsynced, the directory is
renamed into place, and only then is `checkpoint-last` re-pointed (a new symlink renamed over the old
one). A kill at any moment therefore leaves `checkpoint-last` pointing at a complete checkpoint.

Only directories named `checkpoint-` plus at least six digits are checkpoints: a user's
`checkpoint-best`, a file or a symlink with such a name is neither read, pruned nor a reason to fail.
A checkpoint is complete when every file in it parses (`read_checkpoint`); resuming takes the one
`checkpoint-last` names, or, when that link is gone or its checkpoint does not read, the newest
complete one before it (`find_resumable`). Files and directories get the permissions `open()` gives
(0o666 / 0o777 minus the umask), like the rest of the run's output.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

from ..core.adapters import get_state
from ..core.io import adapter_state_dict, load_adapter_state_dict, read_adapter, read_tensors, save

LAST = "checkpoint-last"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
SCHEDULE_FILE = "schedule.safetensors"
SCHEDULE_FILES = {"method_schedule": SCHEDULE_FILE, "training_schedule": "training_schedule.safetensors"}
"""trainer_state.json key -> tensor file, for each kind of schedule a checkpoint may hold."""


_NAME = re.compile(r"checkpoint-(\d{6,})")
_STATE_KEYS = ("step", "micro_batches", "data", "trainable", "history", "optimizer", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not fit the run that tries to resume from it."""


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"checkpoint-{step:06d}"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `checkpoint-last` points at, or None when the run has none yet (or the link is broken)."""
    name = _link_target(Path(output_dir))
    path = Path(output_dir) / name if name else None
    return path if path is not None and (path / STATE_FILE).is_file() else None


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every real `checkpoint-NNNNNN` directory in `output_dir`, by step.

    Anything else with a checkpoint-like name (`checkpoint-best`, a file, a symlink) is left alone:
    it is not ours to read or delete, and `int()` of its name must not stop a save.
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()]
    return sorted(found)


def _link_target(output_dir: Path) -> str | None:
    """The checkpoint name `checkpoint-last` points at (a name inside output_dir), or None."""
    link = output_dir / LAST
    if not link.is_symlink():
        return None
    name = os.readlink(link)
    return name if _NAME.fullmatch(name) else None


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


# --- writing ----------------------------------------------------------------------------------
def save_checkpoint(output_dir: str | os.PathLike, step: int, model: nn.Module, optimizer, state: dict,
                    rng: tuple[dict, dict], keep: int = 2, method_schedule=None, training_schedule=None) -> Path:
    """Write a complete checkpoint atomically, point `checkpoint-last` at it and prune old ones.

    `state` is the JSON part the loop owns (step, data position, history, run config); `rng` comes
    from `capture_rng`; `method_schedule` is the model's MethodSchedule (rank budgets), if any, and
    `training_schedule` the run's LISA / IST, if any.
    Call on one rank only, by the process that holds `output_dir`'s lock (`output_dir.claim`):
    temporary directories of other processes are deleted as left by a kill. Returns the directory.
    """
    output_dir = Path(output_dir)
    trained = get_state(model).name  # with several adapters on the model: the one being trained
    tensors = adapter_state_dict(model, trained)
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # the loop stops before this; a checkpoint must never be the first file to hold a diverged model
        raise CheckpointError(f"not writing checkpoint {step}: adapter tensor(s) {', '.join(bad[:5])} hold NaN or "
                              "infinite values")
    final = output_dir / checkpoint_name(step)
    tmp = output_dir / f".tmp-{final.name}-{os.getpid()}"
    _remove(tmp)
    save(model, tmp, name=trained)  # adapter weights + config: the directory is also a loadable adapter
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    _write_tensors(tmp / OPTIMIZER_FILE, opt_tensors)
    _write_tensors(tmp / RNG_FILE, rng[0])
    meta = {**state, "optimizer": opt_meta, "rng": rng[1]}
    for key, schedule in (("method_schedule", method_schedule), ("training_schedule", training_schedule)):
        if schedule is not None:
            schedule_tensors, meta[key] = split_schedule_state(schedule.state_dict())
            _write_tensors(tmp / SCHEDULE_FILES[key], schedule_tensors)
    (tmp / STATE_FILE).write_text(json.dumps(meta))
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)
    _remove(final)  # left by an earlier run that was resumed from an older checkpoint, or not ours at all
    os.rename(tmp, final)
    link = output_dir / f".tmp-{LAST}-{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(final.name, link)
    os.replace(link, output_dir / LAST)
    _fsync(output_dir)
    _prune(output_dir, keep, step)
    return final


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file with the permissions `open()` gives (`save_file` makes every file 0600)."""
    path.write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a file, a symlink (not what it points to) or a directory tree, if there is one."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _prune(output_dir: Path, keep: int, newest: int) -> None:
    """Keep the `keep` newest checkpoints up to step `newest`; delete the rest and what kills left.

    Checkpoints after `newest` belong to a future this run abandoned (it resumed from an earlier
    one): left in place, they would be taken for this run's when `checkpoint-last` is lost.
    """
    for stale in output_dir.glob(".tmp-checkpoint-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            _remove(stale)
    done = checkpoint_dirs(output_dir)
    older = [path for step, path in done if step < newest]
    for step, path in done:
        if step > newest or path in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(path)


# --- reading ----------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """Every file of one checkpoint, parsed (`read_checkpoint`); nothing is applied to a model yet."""

    path: Path
    meta: dict
    """trainer_state.json."""
    adapter_config: dict
    """The adapter config the weights were trained with (`AdapterConfig.to_dict()`)."""
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    schedule: dict[str, torch.Tensor] | None
    base_fingerprint: dict
    """The fingerprint of the base the adapter was trained on (peftkit_adapter.json)."""
    training_schedule: dict[str, torch.Tensor] | None = None
    """The training schedule's tensors (LISA, IST), when the run had one."""

    @property
    def step(self) -> int:
        return self.meta["step"]


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and parse every file of a checkpoint; CheckpointError names the one missing or corrupt."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: it has no {STATE_FILE}")
    try:
        meta = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:  # truncated, not JSON, not UTF-8
        raise CheckpointError(f"{state_file} is truncated or corrupt ({err})") from err
    missing = [key for key in _STATE_KEYS if key not in meta] if isinstance(meta, dict) else list(_STATE_KEYS)
    if missing or not isinstance(meta["step"], int) or isinstance(meta["step"], bool) or meta["step"] < 0:
        raise CheckpointError(f"{state_file} is corrupt or from another program: it lacks {missing or ['step']}")
    try:
        adapter_config, adapter_meta, adapter = read_adapter(path)
        files = [OPTIMIZER_FILE, RNG_FILE] + [name for key, name in SCHEDULE_FILES.items() if key in meta]
        tensors = {name: read_tensors(path / name) for name in files}
    except Exception as err:  # noqa: BLE001  any file that does not parse makes the checkpoint incomplete
        raise CheckpointError(f"{path} is incomplete or corrupt: {err}") from err
    return Checkpoint(path, meta, adapter_config.to_dict(), adapter, tensors[OPTIMIZER_FILE],
                      tensors[RNG_FILE], tensors.get(SCHEDULE_FILE), adapter_meta.get("base_fingerprint") or {},
                      tensors.get(SCHEDULE_FILES["training_schedule"]))


def find_resumable(output_dir: str | os.PathLike) -> tuple[Checkpoint | None, list[str]]:
    """The checkpoint `resume=True` continues from, and why each newer candidate was passed over.

    That is the one `checkpoint-last` points at when all its files parse; otherwise the newest
    complete checkpoint before it (before any, when the link is missing or dangling: a kill between
    the rename and the link, or a user who deleted it).
    """
    done = checkpoint_dirs(output_dir)
    target = _link_target(Path(output_dir))
    steps = {path.name: step for step, path in done}
    limit = steps.get(target) if target else None
    candidates = [path for step, path in reversed(done) if limit is None or step <= limit]
    skipped = [] if target is None or limit is not None else [f"{LAST} points at {target}, which is not there"]
    for path in candidates:
        try:
            return read_checkpoint(path), skipped
        except CheckpointError as err:
            skipped.append(str(err))
    return None, skipped


def load_checkpoint(checkpoint: Checkpoint | str | os.PathLike, model: nn.Module, optimizer, rank: int,
                    method_schedule=None, training_schedule=None, trainable: list[str] | None = None) -> dict:
    """Load adapter, optimizer, method and training schedules and RNG states; returns the JSON state.

    `trainable` names the parameters the run trains (default: those with requires_grad); a run with
    a training schedule passes every parameter the schedule may activate, a set that does not move.

    The optimizer keeps its hyperparameters as the current run built them (`initial_lr`, `lr`,
    `weight_decay`) and takes only its state (moments, step counts) from the checkpoint: the loop
    then sets the learning rate from the current schedule, so a resumed run with a changed lr or
    max_steps follows the new schedule instead of the values baked into the old one.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    meta = ckpt.meta
    if trainable is None:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if meta["trainable"] != trainable:
        raise CheckpointError(
            f"{ckpt.path} was saved from a model with other trainable parameters "
            f"({len(meta['trainable'])} saved, {len(trainable)} now); resume with the same adapter config"
        )
    if method_schedule is not None and ckpt.schedule is None:
        raise CheckpointError(f"{ckpt.path} holds no state of the method's schedule (written by a run without "
                              "it); resume with the adapter config it was trained with")
    if (training_schedule is None) != (ckpt.training_schedule is None):
        saved = "a" if ckpt.training_schedule is not None else "no"
        raise CheckpointError(f"{ckpt.path} holds {saved} training schedule state (LISA/IST) and this run has "
                              f"{'none' if training_schedule is None else type(training_schedule).__name__}; "
                              "resume with the schedule it was trained with")
    template = optimizer.state_dict()
    # own, freshly allocated copies: tensors read from a safetensors buffer need not be as aligned as
    # torch's allocations, and BLAS kernels (Natural GaLore's Woodbury products) round differently on
    # another alignment, so a resumed run drifted from the uninterrupted one in the last bits
    tensors = {k: v.clone() for k, v in ckpt.optimizer.items()}
    try:
        saved = unflatten_optimizer(tensors, meta["optimizer"], template)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"the optimizer state in {ckpt.path} does not fit this run's optimizer ({err}); "
                              "resume with the optimizer it was trained with") from err
    for group, live in zip(saved["param_groups"], template["param_groups"], strict=True):
        group.update({k: live[k] for k in ("lr", "initial_lr", "weight_decay") if k in live})
    optimizer.load_state_dict(saved)
    if method_schedule is not None:
        method_schedule.load_state_dict({**meta["method_schedule"], **ckpt.schedule})
    if training_schedule is not None:
        training_schedule.load_state_dict({**meta["training_schedule"], **ckpt.training_schedule})
    load_adapter_state_dict(model, ckpt.adapter)  # last of what can fail: the model changes only if all fit
    restore_rng(ckpt.rng, meta["rng"], rank)
    return meta
