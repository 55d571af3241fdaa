"""Continuing a run from a checkpoint under the current settings, or refusing where that cannot be right.

A checkpoint stores the run's TrainConfig (trainer_state.json) and the adapter config it trained
(peftkit_adapter.json). On resume:

- a different adapter (method, rank, alpha, targets, ...) is refused: the weights would be read into
  a model they were not trained for, or scaled differently without a word;
- a different schedule (lr, max_steps, epochs, warm-up, weight decay, clipping) is allowed with a
  warning, and the learning rate is derived from the CURRENT schedule at the saved step, instead of
  restoring a scheduler state that baked in the old peak and length (which ran a step at lr 0);
- a different data order (seed, batch size, grad_accum, world size, examples) is allowed with a warning;
- a checkpoint past the new run's last step is refused with what to change;
- a different optimizer or training schedule, or one of their settings (`TRAINING_METHOD_FIELDS`), is
  refused: the saved optimizer and schedule states (GaLore's projections, MeZO's seed stream, LISA's
  and IST's active blocks) mean something only under the settings that wrote them.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from ..core.apply import get_state
from ..core.config import ConfigError
from ..core.fingerprint import same_record
from .checkpoint import Checkpoint, CheckpointError, find_resumable, load_checkpoint, read_checkpoint
from .config import OPTIMIZERS, SCHEDULES, TrainConfig
from .distributed import Dist

SCHEDULE_FIELDS = ("lr", "max_steps", "epochs", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm")
"""TrainConfig fields a resumed run may change: it continues under the new values, with a warning."""

TRAINING_METHOD_FIELDS = ("optimizer", "schedule", *(f.name for f in dataclasses.fields(TrainConfig)
                                                     if f.name.split("_")[0] in {*OPTIMIZERS, *SCHEDULES} - {None}))
"""TrainConfig fields a resumed run must keep: the optimizer, the schedule and every setting named after one
(`galore_rank`, `mgpo_rho` ...), so a new one's settings are covered without a list to extend (a checkpoint
without them was written with their defaults)."""


def data_key(cfg: TrainConfig, run: Dist, n: int) -> dict:
    """What fixes the data order: a resumed run with other values cannot repeat the original one."""
    return {"seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "world_size": run.world, "examples": n}


def run_state(cfg: TrainConfig, run: Dist, n: int, model, params=None) -> dict:
    """The JSON a checkpoint stores about the run, besides step and history."""
    return {"data": data_key(cfg, run, n), "train_config": dataclasses.asdict(cfg),
            "trainable": trained_names(model, params)}


def trained_names(model, params=None) -> list[str]:
    """Names of the parameters the run trains: `params` (the loop's, which include what a training
    schedule has frozen for now), or those with requires_grad."""
    if params is None:
        return [name for name, p in model.named_parameters() if p.requires_grad]
    ids = {id(p) for p in params}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def resume_state(resume, cfg: TrainConfig, model, optimizer, scheduler, run: Dist, n: int, total: int,
                 schedules: dict | None = None, params=None) -> dict:
    """Step 0, or the checkpoint's state after loading its weights, optimizer, schedules and RNG.

    `schedules` maps "method_schedule" / "training_schedule" to the run's (or None); `params` are the
    parameters the run trains. Returns the checkpoint's JSON state plus "path" (the checkpoint resumed
    from, or None).
    """
    fresh = {"step": 0, "history": {"train_loss": [], "eval": []}, "path": None}
    if not resume:
        return fresh
    ckpt = _checkpoint_to_resume(resume, Path(cfg.output_dir))
    if ckpt is None:
        if run.rank == 0:
            print(f"resume: no checkpoint in {cfg.output_dir} yet, starting from step 0")
        return fresh
    _check_adapter(ckpt, model)
    if ckpt.step > total:
        raise ConfigError(f"{ckpt.path} is at step {ckpt.step}, past this run's last step {total} (max_steps="
                          f"{cfg.max_steps}, epochs={cfg.epochs}); raise max_steps above {ckpt.step} to continue it, "
                          "or start a fresh run (overwrite=True or another output_dir)")
    _check_training_method(ckpt, cfg)
    _warn_changes(ckpt, cfg, run, n)
    state = load_checkpoint(ckpt, model, optimizer, run.rank, **(schedules or {}),
                            trainable=trained_names(model, params))
    position_schedule(scheduler, optimizer, ckpt.step)
    if run.rank == 0:
        print(f"resumed from {ckpt.path} at step {ckpt.step}, lr {optimizer.param_groups[0]['lr']:.3g}")
    return {**state, "path": ckpt.path}


def position_schedule(scheduler, optimizer, step: int) -> None:
    """Set a LambdaLR (and its optimizer's learning rates) to where it is after `step` steps.

    The same arithmetic as `scheduler.step()` (base lr times the multiplier of `step`), so a resumed
    run with unchanged settings repeats the uninterrupted run's learning rates bit for bit.
    """
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def _checkpoint_to_resume(resume, output_dir: Path) -> Checkpoint | None:
    """The named checkpoint (no fallback), or output_dir's newest complete one (with a warning on skips)."""
    if resume is not True:
        return read_checkpoint(resume)
    ckpt, skipped = find_resumable(output_dir)
    if ckpt is None and skipped:
        raise CheckpointError(f"no complete checkpoint in {output_dir} to resume from: {'; '.join(skipped)}. "
                              "Start a fresh run with overwrite=True, or resume from a copy of a good one")
    if skipped:
        warnings.warn(f"resuming from {ckpt.path} (step {ckpt.step}) instead of a newer checkpoint: "
                      f"{'; '.join(skipped)}", stacklevel=4)
    return ckpt


def _check_adapter(ckpt: Checkpoint, model) -> None:
    """Refuse a model whose adapter config, or whose base, differs from the ones the checkpoint was trained with."""
    live = json.loads(json.dumps(get_state(model).config.to_dict()))  # tuples -> lists, as saved
    saved = json.loads(json.dumps(ckpt.adapter_config))
    differ = [f"{k}: {saved.get(k)!r} then, {live.get(k)!r} now" for k in sorted(set(saved) | set(live))
              if saved.get(k) != live.get(k)]
    live_prints = get_state(model).fingerprint
    differ += [f"base weights of {name}" for name, (shape, record) in ckpt.base_fingerprint.items()
               if name in live_prints and (live_prints[name][0] != shape or not same_record(record, live_prints[name][1]))]
    if differ:
        raise CheckpointError(f"{ckpt.path} was trained with another adapter config or base ({'; '.join(differ)}); resume "
                              "with the config it was trained with, or start a fresh run (overwrite=True or "
                              "another output_dir)")


def _check_training_method(ckpt: Checkpoint, cfg: TrainConfig) -> None:
    """Refuse another optimizer or training schedule, or other settings of them, than the checkpoint's."""
    saved_cfg = ckpt.meta.get("train_config") or {}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    differ = [f"{k}: {saved_cfg.get(k, defaults[k])!r} then, {getattr(cfg, k)!r} now" for k in TRAINING_METHOD_FIELDS
              if saved_cfg.get(k, defaults[k]) != getattr(cfg, k)]
    if differ:
        raise CheckpointError(f"{ckpt.path} was trained with another optimizer or schedule ({'; '.join(differ)}); its "
                              "optimizer and schedule states hold only under those settings: resume with them, or "
                              "start a fresh run (overwrite=True or another output_dir)")


def _warn_changes(ckpt: Checkpoint, cfg: TrainConfig, run: Dist, n: int) -> None:
    """Warn about a changed schedule or data order: allowed, but the run is not the interrupted one."""
    saved_cfg = ckpt.meta.get("train_config") or {}
    schedule = {k: (saved_cfg[k], getattr(cfg, k)) for k in SCHEDULE_FIELDS
                if k in saved_cfg and saved_cfg[k] != getattr(cfg, k)}
    if schedule:
        shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in schedule.items())
        warnings.warn(f"resuming {ckpt.path} with a changed schedule ({shown}): from step {ckpt.step} on the "
                      "learning rate follows the current settings", stacklevel=4)
    saved_data = ckpt.meta["data"]
    changed = {k: (v, saved_data.get(k)) for k, v in data_key(cfg, run, n).items() if saved_data.get(k) != v}
    if changed:
        warnings.warn(f"resuming from {ckpt.path} with changed {changed} (now, saved): the data order will "
                      "differ from the interrupted run's", stacklevel=4)
