"""The training loop: one explicit loop over optimizer steps, in the order a reader expects.

    for step in start+1 .. total:
        grad_accum micro-batches: forward (bf16 autocast when on) + callbacks' extra losses, backward
        stop on a non-finite loss or gradient (NonFiniteLossError; the last checkpoint is left as it was)
        average the trainable gradients over ranks (frozen base weights are never sent)
        callbacks' on_after_backward -> clip -> optimizer step -> lr schedule step -> zero_grad
        stop when the update made a trainable weight non-finite (nothing is saved from it)
        record the loss; evaluate every eval_every steps; checkpoint every save_every steps

A run holds `output_dir/.lock` while it trains, and a fresh run refuses an output_dir that holds
another run's checkpoints or metrics.json unless given `resume` or `overwrite` (`output_dir.py`).
Resuming checks the saved adapter and train configs against the current ones (`resume.py`).

Callbacks are plain objects with either or both of two optional methods; that is the whole protocol:

* `extra_loss(model) -> Tensor | None`: a term added to every micro-batch's loss (regularizers; None adds
  nothing, as a MethodSchedule without one returns);
* `on_after_backward(step, model, optimizer)`: once per optimizer step (`step` counts from 1), after
  every backward pass and the cross-rank gradient average, before clipping, `optimizer.step()` and
  `zero_grad()`; rank-budget schedules read and edit gradients here.

A method that needs per-step work (AdaLoRA's budget, IncreLoRA's growth) has a `MethodSchedule`
(`peftkit.schedule_for`); the loop adds it to the callbacks by itself unless one is passed, and
saves and restores its state with every checkpoint.

`cfg.optimizer` picks AdamW, GaLore or MeZO and `cfg.schedule` a training schedule (LISA, IST) that
runs right after the method's schedule and is checkpointed beside it (`memory_saving.py`). With MeZO a
step is two forward passes of a closure instead of forward + backward: no gradient, no clipping,
callbacks' on_after_backward still run once per step, before the update (with no gradients to read).

Determinism: epoch e's data order is a permutation drawn from a generator seeded with (seed, e),
split across ranks like DistributedSampler. A resumed run recomputes it and starts at the saved
micro-batch position; with weights, optimizer, scheduler and RNG states restored it repeats the
uninterrupted run exactly.

Distributed: under `torchrun --nproc_per_node N` the loop starts the process group (gloo on CPU,
nccl on GPU), broadcasts rank 0's trainable parameters so all ranks start equal, and all-reduces
only the trainable gradients itself: no DDP wrapper, the model stays the user's. Rank 0 alone writes
files and shows the progress bar; resuming ranks read rank 0's checkpoint (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.adapters import active_adapters
from ..core.apply import has_adapter
from ..core.config import ConfigError
from ..core.io import save
from ..core.params import param_groups, trainable_parameters
from ..core.schedule import MethodSchedule
from .checkpoint import capture_rng, checkpoint_name, save_checkpoint
from .config import TrainConfig  # noqa: F401  (re-exported: the loop's settings)
from .distributed import Dist, all_reduce_gradients, epoch_batches, setup_distributed  # noqa: F401
from .evaluation import accuracy, autocast_for, evaluate, loss_of, to_device  # noqa: F401
from .finite import NonFiniteLossError, loss_and_gradients, nonfinite_names, weights_finite
from .memory_saving import MeZO, mezo_update, next_batches, optimizer_for, run_schedules
from .output_dir import OutputDirError, check_fresh, claim, clear_previous_run
from .plots import plot_loss
from .resume import resume_state, run_state


def micro_batches(data, collate_fn: Callable, cfg: TrainConfig, start: int, run: Dist) -> Iterator[dict]:
    """Micro-batches from position `start` (counted from the first epoch's first batch) on, forever."""
    per_epoch = len(epoch_batches(len(data), cfg.batch_size, 0, 0, run.rank, run.world))
    epoch, skip = divmod(start, per_epoch)
    while True:
        batches = epoch_batches(len(data), cfg.batch_size, cfg.seed, epoch, run.rank, run.world)[skip:]
        # An own generator: the default one would draw worker seeds from the global RNG and shift dropout.
        loader = DataLoader(data, batch_sampler=batches, collate_fn=collate_fn, num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        yield from loader
        epoch, skip = epoch + 1, 0


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier of the 0-based `step`: linear warm-up, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def _build_optimizer(model: nn.Module, params: list[nn.Parameter], optimizer, cfg: TrainConfig):
    """cfg.optimizer (AdamW, GaLore, MeZO) over the trainable parameters, unless given an optimizer or a
    param-group builder (whose groups then get cfg.optimizer).

    By default one group per learning rate the adapter asks for (`param_groups`: DePT trains its
    prompt and its embedding update with two); one group, at `cfg.lr`, for most methods.
    """
    if isinstance(optimizer, torch.optim.Optimizer) and cfg.optimizer != "adamw":
        raise ConfigError(f"train() got both an optimizer object and cfg.optimizer={cfg.optimizer!r}; pass one: "
                          "the object (leave cfg.optimizer at 'adamw') or the setting")
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    groups = optimizer(model) if callable(optimizer) else param_groups(model, cfg.lr)
    if isinstance(groups, torch.optim.Optimizer):
        return groups
    return optimizer_for(groups, cfg)


def train(model: nn.Module, train_data, eval_data, cfg: TrainConfig, collate_fn: Callable, *,
          optimizer=None, resume: bool | str | os.PathLike = False, metric_fn: Callable = accuracy,
          callbacks: Sequence = (), overwrite: bool | None = None) -> dict:
    """Train the model's trainable (adapter) parameters; returns the metrics also written to metrics.json.

    Args:
        model: a model with a peftkit adapter whose forward takes a batch's keys and returns .loss.
        train_data, eval_data: map-style datasets of dicts of tensors; `eval_data` may be None.
        collate_fn: list of dataset items -> batch dict (e.g. `partial(collate, pad_id=...)`).
        optimizer: None (AdamW over the trainable parameters), an optimizer, or a callable
            `model -> optimizer | param groups` (param groups get AdamW with `cfg.lr` as default).
        resume: True continues from `output_dir/checkpoint-last` (from step 0 when there is none;
            from the newest complete checkpoint when that one is missing or corrupt); a path
            continues from that checkpoint. The adapter config must be the one it was trained with.
        metric_fn: `(output, batch) -> {name: (numerator, denominator)}` for evaluation.
        callbacks: objects with optional `extra_loss` / `on_after_backward` (module docstring).
        overwrite: a fresh run may clear another run's files from `output_dir` (default: `cfg.overwrite`).

    Raises:
        NonFiniteLossError: the loss, a gradient or an updated weight became NaN/inf; metrics.json
            records it, checkpoints stay untouched.
        OutputDirError: another process trains in `output_dir`, or it holds another run's files and
            neither `resume` nor `overwrite` was given.
    """
    _check_trained_adapters(model, cfg, resume)
    run = setup_distributed(cfg.device)
    was_training = model.training
    overwrite = cfg.overwrite if overwrite is None else overwrite
    try:
        with contextlib.ExitStack() as held:
            _claim_output_dir(cfg, resume, overwrite, run, held)  # held until the run is over
            result = _train(model, train_data, eval_data, cfg, collate_fn, optimizer, resume, metric_fn, callbacks,
                            run)
            if run.owns_group:
                # no rank tears its group down while a peer is still inside a collective or writing the
                # last checkpoint: gloo aborted a rank whose peer closed its sockets first (rare, seen in CI)
                dist.barrier()
        return result
    finally:
        model.train(was_training)  # hand the model back in the mode it came in
        if run.owns_group:
            dist.destroy_process_group()


def _check_trained_adapters(model: nn.Module, cfg: TrainConfig, resume) -> None:
    """Checkpoints hold the one adapter being trained; several active adapters train together only without them."""
    active = active_adapters(model)
    if len(active) > 1 and (cfg.save_every or resume):
        raise ConfigError(f"adapters {active} are active and would train together, but a checkpoint holds one "
                          "adapter; train without checkpoints (save_every=0, no resume), or one adapter at a time "
                          "(peftkit.set_active(model, name))")


def _claim_output_dir(cfg: TrainConfig, resume, overwrite: bool, run: Dist, held: contextlib.ExitStack) -> None:
    """Rank 0 locks output_dir and checks (or clears) what an earlier run left; every rank learns the outcome."""
    out = Path(cfg.output_dir)
    error = None
    if run.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(claim(out))
            check_fresh(out, resume, overwrite)
            removed = clear_previous_run(out) if overwrite and not resume else []
            if removed:
                print(f"overwrite: removed {', '.join(removed)} from {out}")
        except (OutputDirError, OSError) as err:
            error = err
    if run.world > 1:  # the other ranks must not go on into collectives rank 0 will never join
        failed = torch.tensor([float(error is not None)], device=run.device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            raise OutputDirError(f"rank 0 could not use output_dir {out}; its error says why")
    if error is not None:
        raise error


def _train(model, train_data, eval_data, cfg, collate_fn, optimizer, resume, metric_fn, callbacks, run) -> dict:
    out = Path(cfg.output_dir)
    params, optimizer, scheduler, total = _setup(model, train_data, cfg, optimizer, run)
    schedules = run_schedules(model, callbacks, total, optimizer, cfg, (eval_data, collate_fn), run)
    method_schedule, training_schedule = schedules["method_schedule"], schedules["training_schedule"]
    callbacks = [*callbacks, method_schedule] if method_schedule not in (None, *callbacks) else callbacks
    state = resume_state(resume, cfg, model, optimizer, scheduler, run, len(train_data), total, schedules, params)
    start, history, last_good = state["step"], state["history"], state["path"]
    data = micro_batches(train_data, collate_fn, cfg, start * cfg.grad_accum, run)
    extra_losses = [cb.extra_loss for cb in callbacks if hasattr(cb, "extra_loss")]
    after_backward = [cb.on_after_backward for cb in callbacks if hasattr(cb, "on_after_backward")]
    if training_schedule is not None:  # after every other hook: the method's schedule still sees all gradients
        after_backward.append(lambda step, model, optimizer: training_schedule.step(step, optimizer))
    bar = tqdm(total=total, initial=start, unit="step", disable=not (cfg.progress and run.rank == 0))
    started = time.perf_counter()
    try:
        for step in range(start + 1, total + 1):
            if isinstance(optimizer, MeZO):  # forward passes only: the closure's losses give the update
                loss_value, lr = mezo_update(step, next_batches(data, cfg, run), model, params, optimizer, scheduler,
                                             (extra_losses, after_backward), cfg, run, last_good)
            else:
                step_loss = _forward_backward(model, data, extra_losses, cfg, run)
                loss_value, lr = _update(step, step_loss, model, params, optimizer, scheduler, after_backward, cfg,
                                         run, last_good)
            history["train_loss"].append({"step": step, "loss": loss_value, "lr": lr})
            _report(bar, cfg, run, step, total, loss_value, lr, (step - start) / (time.perf_counter() - started))
            if eval_data is not None and (step == total or (cfg.eval_every and step % cfg.eval_every == 0)):
                figures = evaluate(model, eval_data, collate_fn, cfg, run, metric_fn)
                history["eval"].append({"step": step, **figures})
                _report_eval(cfg, run, history["eval"][-1])
            if cfg.save_every and (step % cfg.save_every == 0 or step == total):
                last_good = _checkpoint(out, step, model, optimizer, cfg, run, history, len(train_data), schedules,
                                        params)
    except NonFiniteLossError as err:
        optimizer.zero_grad(set_to_none=True)
        _finish(model, cfg, run, history, f"stopped: non-finite {err.what} at step {err.step}", started, start)
        raise
    finally:
        bar.close()
        for p in params:  # a training schedule froze what was idle at the end; the model trains all of it again
            p.requires_grad_(True)
    if run.rank == 0 and cfg.save_adapter:
        save(model, out / "adapter")
    return _finish(model, cfg, run, history, "completed", started, start)


def _forward_backward(model, data: Iterator[dict], extra_losses, cfg: TrainConfig, run: Dist) -> torch.Tensor:
    """Forward and backward over grad_accum micro-batches; dividing by grad_accum makes the loss their mean."""
    step_loss = torch.zeros((), device=run.device)
    for _ in range(cfg.grad_accum):
        batch = to_device(next(data), run.device)
        with autocast_for(cfg, run.device):
            terms = [t for term in extra_losses if (t := term(model)) is not None]
            loss = loss_of(model(**batch)) + sum(terms)
        (loss / cfg.grad_accum).backward()
        step_loss += loss.detach().float() / cfg.grad_accum
    return step_loss


def _update(step: int, step_loss: torch.Tensor, model, params, optimizer, scheduler, after_backward, cfg, run: Dist,
            last_good: Path | None) -> tuple[float, float]:
    """Check, average, hook, clip, step: one optimizer update; returns the step's loss and learning rate.

    Raises NonFiniteLossError before the update on a non-finite loss or gradient, and after it when the
    update made a trainable weight non-finite (a finite loss does not guarantee a finite update).
    """
    # averaged over ranks with a flag for non-finite gradients, so every rank stops at the same step
    loss_value, grads_ok = loss_and_gradients(step_loss, params, run)
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(step, loss_value, last_good)
    if not grads_ok:
        raise NonFiniteLossError(step, loss_value, last_good, "gradient", nonfinite_names(model, grads=True))
    # gradients are per-rank sums until here: average the trainable ones, then let callbacks see them
    all_reduce_gradients(params, run.world)
    for hook in after_backward:
        hook(step, model, optimizer)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not weights_finite(params, run):
        raise NonFiniteLossError(step, loss_value, last_good, "weights", nonfinite_names(model, grads=False))
    return loss_value, lr


def _setup(model, train_data, cfg: TrainConfig, optimizer, run: Dist):
    """Checks, seeding, device, equal adapters on all ranks, optimizer and schedule."""
    if not has_adapter(model):
        raise ConfigError("train() expects a model with a peftkit adapter; call peftkit.apply(model, config) first")
    if len(train_data) < run.world:
        raise ValueError(f"train_data has {len(train_data)} examples, fewer than the {run.world} ranks")
    torch.manual_seed(cfg.seed)  # the same on every rank: equal dropout streams, like a single process
    model.to(run.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if run.world > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p, src=0)  # adapters start equal even if ranks initialised them differently
    optimizer = _build_optimizer(model, params, optimizer, cfg)
    total = cfg.total_steps(len(epoch_batches(len(train_data), cfg.batch_size, 0, 0, run.rank, run.world)))
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * total)
    if warmup >= total > 1 and run.rank == 0:
        warnings.warn(f"warm-up ({warmup} steps) is not shorter than the run ({total} steps): the learning rate "
                      f"never reaches lr={cfg.lr:g} and never decays", stacklevel=4)
    scheduler = LambdaLR(optimizer, partial(linear_schedule, warmup=warmup, total=total))
    return params, optimizer, scheduler, total


def _report(bar, cfg: TrainConfig, run: Dist, step: int, total: int, loss: float, lr: float,
            steps_per_s: float) -> None:
    """Progress bar (loss, lr, samples/s; tqdm adds steps/s and ETA) and a log line every log_every steps."""
    samples_s = steps_per_s * cfg.batch_size * cfg.grad_accum * run.world
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_s:.1f}", refresh=False)
    bar.update()
    if run.rank == 0 and cfg.log_every and step % cfg.log_every == 0:
        tqdm.write(f"step {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  {samples_s:.1f} samples/s")


def _report_eval(cfg: TrainConfig, run: Dist, figures: dict) -> None:
    if run.rank == 0 and cfg.log_every:
        shown = "  ".join(f"eval {k} {v:.4f}" for k, v in figures.items() if k != "step")
        tqdm.write(f"step {figures['step']}: {shown}")


def _checkpoint(out: Path, step: int, model, optimizer, cfg: TrainConfig, run: Dist, history: dict, n: int,
                schedules: dict[str, MethodSchedule | None], params: list[nn.Parameter]) -> Path:
    """Write the checkpoint of `step` (rank 0; every rank takes part in gathering RNG states); its path."""
    rng = capture_rng(run.world, run.device)  # a collective: every rank takes part
    if run.rank == 0:
        state = {"step": step, "micro_batches": step * cfg.grad_accum, **run_state(cfg, run, n, model, params),
                 "history": history}
        save_checkpoint(out, step, model, optimizer, state, rng, keep=cfg.keep_checkpoints, **schedules)
    return out / checkpoint_name(step)


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory (VmHWM, Linux) and peak CUDA allocation of this process, in MiB."""
    rss = None
    try:
        with open("/proc/self/status") as status:
            rss = next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")), None)
    except OSError:
        pass
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": rss, "peak_cuda_mb": cuda}


def _finish(model, cfg: TrainConfig, run: Dist, history: dict, status: str, started: float, start: int) -> dict:
    """Final figures; rank 0 writes metrics.json and loss.png."""
    elapsed = time.perf_counter() - started
    train_loss, evals = history["train_loss"], history["eval"]
    steps = train_loss[-1]["step"] if train_loss else 0
    steps_per_s = (steps - start) / elapsed if elapsed else None  # the steps this process ran
    count = trainable_parameters(model)
    final = {"train_loss": train_loss[-1]["loss"] if train_loss else None}
    final |= {f"eval_{k}": v for k, v in (evals[-1] if evals else {}).items() if k != "step"}
    final |= {"time_s": elapsed, "steps_per_s": steps_per_s,
              "samples_per_s": steps_per_s and steps_per_s * cfg.batch_size * cfg.grad_accum * run.world,
              **peak_memory_mb(run.device), "trainable_params": count.trainable, "total_params": count.total,
              "trainable_share": count.share}
    metrics = {"status": status, "steps": steps, "world_size": run.world, "final": final,
               "train_loss": train_loss, "eval": evals, "config": dataclasses.asdict(cfg)}
    if run.rank == 0:
        out = Path(cfg.output_dir)
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=1))
        os.replace(tmp, out / "metrics.json")
        plot_loss(metrics, out / "loss.png")
    return metrics
