"""The training loop: one explicit loop over optimizer steps, in the order a reader expects.

    for step in start+1 .. total:
        grad_accum micro-batches: forward (bf16 autocast when on) + callbacks' extra losses, backward
        stop on a non-finite loss (NonFiniteLossError; the last checkpoint is left as it was)
        average the trainable gradients over ranks (frozen base weights are never sent)
        callbacks' on_after_backward -> clip -> optimizer step -> lr schedule step -> zero_grad
        record the loss; evaluate every eval_every steps; checkpoint every save_every steps

Callbacks are plain objects with either or both of two optional methods; that is the whole protocol:

* `extra_loss(model) -> Tensor | None`: a term added to every micro-batch's loss (regularizers; None adds
  nothing, as a MethodSchedule without one returns);
* `on_after_backward(step, model, optimizer)`: once per optimizer step (`step` counts from 1), after
  every backward pass and the cross-rank gradient average, before clipping, `optimizer.step()` and
  `zero_grad()`; rank-budget schedules read and edit gradients here.

A method that needs per-step work (AdaLoRA's budget, IncreLoRA's growth) has a `MethodSchedule`
(`peftkit.schedule_for`); the loop adds it to the callbacks by itself unless one is passed, and
saves and restores its state with every checkpoint.

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

from ..core.apply import has_adapter
from ..core.config import ConfigError
from ..core.io import save
from ..core.params import param_groups, trainable_parameters
from ..core.schedule import MethodSchedule, schedule_for
from .checkpoint import capture_rng, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig  # noqa: F401  (re-exported: the loop's settings)
from .distributed import Dist, all_reduce_gradients, epoch_batches, setup_distributed  # noqa: F401
from .evaluation import accuracy, autocast_for, evaluate, loss_of, to_device  # noqa: F401
from .plots import plot_loss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the loop stopped before the optimizer step of that step."""

    def __init__(self, step: int, loss: float, checkpoint: Path | None) -> None:
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        where = (f"The last good checkpoint, {checkpoint}, is untouched: lower lr or check the data, then "
                 "train again with resume=True." if checkpoint else "No checkpoint was written before it.")
        super().__init__(f"loss is {loss} at step {step}; training stopped before that step's optimizer update, "
                         f"so the model holds the weights of step {step - 1}. {where}")


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
    """AdamW over the trainable parameters, unless given an optimizer or a param-group builder.

    By default one group per learning rate the adapter asks for (`param_groups`: DePT trains its
    prompt and its embedding update with two); one group, at `cfg.lr`, for most methods.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    groups = optimizer(model) if callable(optimizer) else param_groups(model, cfg.lr)
    if isinstance(groups, torch.optim.Optimizer):
        return groups
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(model: nn.Module, train_data, eval_data, cfg: TrainConfig, collate_fn: Callable, *,
          optimizer=None, resume: bool | str | os.PathLike = False, metric_fn: Callable = accuracy,
          callbacks: Sequence = ()) -> dict:
    """Train the model's trainable (adapter) parameters; returns the metrics also written to metrics.json.

    Args:
        model: a model with a peftkit adapter whose forward takes a batch's keys and returns .loss.
        train_data, eval_data: map-style datasets of dicts of tensors; `eval_data` may be None.
        collate_fn: list of dataset items -> batch dict (e.g. `partial(collate, pad_id=...)`).
        optimizer: None (AdamW over the trainable parameters), an optimizer, or a callable
            `model -> optimizer | param groups` (param groups get AdamW with `cfg.lr` as default).
        resume: True continues from `output_dir/checkpoint-last` (from step 0 when there is none);
            a path continues from that checkpoint.
        metric_fn: `(output, batch) -> {name: (numerator, denominator)}` for evaluation.
        callbacks: objects with optional `extra_loss` / `on_after_backward` (module docstring).

    Raises:
        NonFiniteLossError: the loss became NaN/inf; metrics.json records it, checkpoints stay untouched.
    """
    run = setup_distributed(cfg.device)
    was_training = model.training
    try:
        result = _train(model, train_data, eval_data, cfg, collate_fn, optimizer, resume, metric_fn, callbacks, run)
        if run.owns_group:
            # no rank tears its group down while a peer is still inside a collective or writing the
            # last checkpoint: gloo aborted a rank whose peer closed its sockets first (rare, seen in CI)
            dist.barrier()
        return result
    finally:
        model.train(was_training)  # hand the model back in the mode it came in
        if run.owns_group:
            dist.destroy_process_group()


def _train(model, train_data, eval_data, cfg, collate_fn, optimizer, resume, metric_fn, callbacks, run) -> dict:
    out = Path(cfg.output_dir)
    params, optimizer, scheduler, total = _setup(model, train_data, cfg, optimizer, run)
    method_schedule = next((cb for cb in callbacks if isinstance(cb, MethodSchedule)), None)
    if method_schedule is None:
        method_schedule = schedule_for(model, total)  # the method's own per-step work, if it has any
        callbacks = [*callbacks, method_schedule] if method_schedule is not None else callbacks
    state = _resume_state(resume, cfg, model, optimizer, scheduler, run, len(train_data), method_schedule)
    start, history = state["step"], state["history"]
    data = micro_batches(train_data, collate_fn, cfg, start * cfg.grad_accum, run)
    extra_losses = [cb.extra_loss for cb in callbacks if hasattr(cb, "extra_loss")]
    after_backward = [cb.on_after_backward for cb in callbacks if hasattr(cb, "on_after_backward")]
    bar = tqdm(total=total, initial=start, unit="step", disable=not (cfg.progress and run.rank == 0))
    started = time.perf_counter()
    try:
        for step in range(start + 1, total + 1):
            # forward and backward over grad_accum micro-batches; dividing by grad_accum makes it their mean
            step_loss = torch.zeros((), device=run.device)
            for _ in range(cfg.grad_accum):
                batch = to_device(next(data), run.device)
                with autocast_for(cfg, run.device):
                    terms = [t for term in extra_losses if (t := term(model)) is not None]
                    loss = loss_of(model(**batch)) + sum(terms)
                (loss / cfg.grad_accum).backward()
                step_loss += loss.detach().float() / cfg.grad_accum
            # averaged over ranks, so a NaN on any rank stops every rank at the same step
            loss_value = _mean_over_ranks(step_loss, run)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(step, loss_value, latest_checkpoint(out))
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

            history["train_loss"].append({"step": step, "loss": loss_value, "lr": lr})
            _report(bar, cfg, run, step, total, loss_value, lr, (step - start) / (time.perf_counter() - started))
            if eval_data is not None and (step == total or (cfg.eval_every and step % cfg.eval_every == 0)):
                figures = evaluate(model, eval_data, collate_fn, cfg, run, metric_fn)
                history["eval"].append({"step": step, **figures})
                _report_eval(cfg, run, history["eval"][-1])
            if cfg.save_every and (step % cfg.save_every == 0 or step == total):
                _checkpoint(out, step, model, optimizer, scheduler, cfg, run, history, len(train_data),
                            method_schedule)
    except NonFiniteLossError as err:
        optimizer.zero_grad(set_to_none=True)
        _finish(model, cfg, run, history, f"stopped: non-finite loss at step {err.step}", started, start)
        raise
    finally:
        bar.close()
    if run.rank == 0 and cfg.save_adapter:
        save(model, out / "adapter")
    return _finish(model, cfg, run, history, "completed", started, start)


def _setup(model, train_data, cfg: TrainConfig, optimizer, run: Dist):
    """Checks, seeding, device, equal adapters on all ranks, optimizer and schedule."""
    if not has_adapter(model):
        raise ConfigError("train() expects a model with a peftkit adapter; call peftkit.apply(model, config) first")
    if len(train_data) < run.world:
        raise ValueError(f"train_data has {len(train_data)} examples, fewer than the {run.world} ranks")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
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
    scheduler = LambdaLR(optimizer, partial(linear_schedule, warmup=warmup, total=total))
    return params, optimizer, scheduler, total


def _mean_over_ranks(value: torch.Tensor, run: Dist) -> float:
    if run.world > 1:
        dist.all_reduce(value)
        value /= run.world
    return value.item()


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


def _data_key(cfg: TrainConfig, run: Dist, n: int) -> dict:
    """What fixes the data order: a resumed run with other values cannot repeat the original one."""
    return {"seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "world_size": run.world, "examples": n}


def _checkpoint(out: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, run: Dist,
                history: dict, n: int, method_schedule: MethodSchedule | None) -> None:
    rng = capture_rng(run.world, run.device)  # a collective: every rank takes part
    if run.rank != 0:
        return
    state = {"step": step, "micro_batches": step * cfg.grad_accum, "data": _data_key(cfg, run, n),
             "trainable": [name for name, p in model.named_parameters() if p.requires_grad], "history": history}
    save_checkpoint(out, step, model, optimizer, scheduler, state, rng, keep=cfg.keep_checkpoints,
                    method_schedule=method_schedule)


def _resume_state(resume, cfg: TrainConfig, model, optimizer, scheduler, run: Dist, n: int,
                  method_schedule: MethodSchedule | None = None) -> dict:
    """Step 0, or the checkpoint's state after loading its weights, optimizer, scheduler and RNG."""
    fresh = {"step": 0, "history": {"train_loss": [], "eval": []}}
    if not resume:
        return fresh
    path = latest_checkpoint(cfg.output_dir) if resume is True else Path(resume)
    if path is None:
        if run.rank == 0:
            print(f"resume: no checkpoint in {cfg.output_dir} yet, starting from step 0")
        return fresh
    state = load_checkpoint(path, model, optimizer, scheduler, run.rank, method_schedule)
    changed = {k: (v, state["data"][k]) for k, v in _data_key(cfg, run, n).items() if state["data"][k] != v}
    if changed:
        warnings.warn(f"resuming from {path} with changed {changed} (now, saved): the data order will "
                      "differ from the interrupted run's", stacklevel=3)
    if run.rank == 0:
        print(f"resumed from {path} at step {state['step']}")
    return state


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
