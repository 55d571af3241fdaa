"""The training loop: one explicit loop over optimizer steps, in the order a reader expects.

    for step in start+1 .. total:
        grad_accum micro-batches: forward (bf16 autocast when on) + callbacks' extra losses, backward
        stop on a non-finite loss (NonFiniteLossError; the last checkpoint is left as it was)
        average the trainable gradients over ranks (frozen base weights are never sent)
        callbacks' on_after_backward -> clip -> optimizer step -> lr schedule step -> zero_grad
        record the loss; evaluate every eval_every steps; checkpoint every save_every steps

Callbacks are plain objects with either or both of two optional methods; that is the whole protocol:

* `extra_loss(model) -> Tensor`: a term added to every micro-batch's loss (regularizers);
* `on_after_backward(step, model, optimizer)`: once per optimizer step (`step` counts from 1), after
  every backward pass and the cross-rank gradient average, before clipping, `optimizer.step()` and
  `zero_grad()`; rank-budget schedules read and edit gradients here.

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
from dataclasses import dataclass
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
from ..core.params import trainable_parameters
from .checkpoint import capture_rng, latest_checkpoint, load_checkpoint, save_checkpoint
from .plots import plot_loss


@dataclass
class TrainConfig:
    """Settings of one training run; every field is documented for `peftkit train --help`."""

    output_dir: str = "out"
    """Directory for checkpoints, metrics.json, loss.png and the final adapter."""

    lr: float = 1e-3
    """Peak learning rate, reached after warm-up and then decayed linearly to 0."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay on the trainable parameters."""

    max_steps: int | None = None
    """Optimizer steps to run; when set it wins over `epochs`."""

    epochs: float = 1.0
    """Passes over the training data (fractions allowed), used when `max_steps` is not set."""

    batch_size: int = 8
    """Examples per micro-batch on each rank."""

    grad_accum: int = 1
    """Micro-batches whose gradients are accumulated into one optimizer step."""

    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up."""

    warmup_ratio: float = 0.0
    """Warm-up as a share of all steps, instead of `warmup_steps`."""

    max_grad_norm: float = 1.0
    """Clip the global L2 norm of the trainable gradients to this; 0 turns clipping off."""

    eval_every: int = 0
    """Evaluate every N steps (and always after the last step); 0 evaluates only at the end."""

    eval_batches: int | None = None
    """Cap on the number of evaluation batches (all ranks together); None evaluates everything."""

    eval_batch_size: int | None = None
    """Examples per evaluation batch; None uses `batch_size`."""

    save_every: int = 0
    """Write a resumable checkpoint every N steps (and after the last step); 0 writes none."""

    keep_checkpoints: int = 2
    """How many of the newest checkpoints stay on disk."""

    seed: int = 0
    """Seed of the torch RNG (dropout) and of the data order; the same on every rank."""

    bf16: str | bool = "auto"
    """bf16 autocast: "auto" (on where the GPU supports bf16, never on CPU), true or false."""

    log_every: int = 50
    """Print a log line every N steps, 0 never; metrics.json records every step's loss anyway."""

    progress: bool = True
    """Show a progress bar (loss, samples/s, ETA) on rank 0."""

    num_workers: int = 0
    """DataLoader worker processes."""

    save_adapter: bool = True
    """Save the final adapter with `peftkit.save` to `output_dir/adapter`."""

    device: str = "auto"
    """Torch device; "auto" picks cuda:LOCAL_RANK when a GPU is present, else cpu."""

    def __post_init__(self) -> None:
        if isinstance(self.bf16, str) and self.bf16.lower() in ("true", "false"):
            self.bf16 = self.bf16.lower() == "true"
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.max_steps is None or self.max_steps >= 1,
             f"max_steps must be >= 1 or None, got {self.max_steps}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1 and self.grad_accum >= 1,
             f"batch_size and grad_accum must be >= 1, got {self.batch_size} and {self.grad_accum}"),
            (self.warmup_steps >= 0 and 0 <= self.warmup_ratio < 1, "warmup_steps must be >= 0 and "
             f"warmup_ratio in [0, 1), got {self.warmup_steps} and {self.warmup_ratio}"),
            (not (self.warmup_steps and self.warmup_ratio), "set warmup_steps or warmup_ratio, not both"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}"),
            (min(self.eval_every, self.save_every, self.log_every, self.num_workers) >= 0,
             "eval_every, save_every, log_every and num_workers must be >= 0"),
            (self.eval_batches is None or self.eval_batches >= 1,
             f"eval_batches must be >= 1 or None, got {self.eval_batches}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.bf16 in ("auto", True, False), f"bf16 must be 'auto', true or false, got {self.bf16!r}"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ConfigError("invalid TrainConfig: " + "; ".join(errors))

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the whole run."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * batches_per_epoch / self.grad_accum))


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the loop stopped before the optimizer step of that step."""

    def __init__(self, step: int, loss: float, checkpoint: Path | None) -> None:
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        where = (f"The last good checkpoint, {checkpoint}, is untouched: lower lr or check the data, then "
                 "train again with resume=True." if checkpoint else "No checkpoint was written before it.")
        super().__init__(f"loss is {loss} at step {step}; training stopped before that step's optimizer update, "
                         f"so the model holds the weights of step {step - 1}. {where}")


@dataclass
class Dist:
    """Where this process sits in the run."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, LOCAL_RANK); a single process otherwise."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
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
    communicated. A parameter without a gradient on this rank contributes zeros.
    """
    if world_size == 1:
        return 0
    sent = 0
    for dtype in sorted({p.dtype for p in params}, key=str):
        group = [p for p in params if p.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        dist.all_reduce(flat)  # one flat buffer instead of one call per tensor
        flat /= world_size
        for p, grad in zip(group, flat.split([p.numel() for p in group]), strict=True):
            p.grad = grad.view_as(p)
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
        with _autocast(cfg, run.device):
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


def _autocast(cfg: TrainConfig, device: torch.device):
    on = cfg.bf16 is True or (cfg.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def _build_optimizer(model: nn.Module, params: list[nn.Parameter], optimizer, cfg: TrainConfig):
    """AdamW over the trainable parameters, unless given an optimizer or a param-group builder."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    groups = optimizer(model) if callable(optimizer) else params
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
        return _train(model, train_data, eval_data, cfg, collate_fn, optimizer, resume, metric_fn, callbacks, run)
    finally:
        model.train(was_training)  # hand the model back in the mode it came in
        if run.owns_group:
            dist.destroy_process_group()


def _train(model, train_data, eval_data, cfg, collate_fn, optimizer, resume, metric_fn, callbacks, run) -> dict:
    out = Path(cfg.output_dir)
    params, optimizer, scheduler, total = _setup(model, train_data, cfg, optimizer, run)
    state = _resume_state(resume, cfg, model, optimizer, scheduler, run, len(train_data))
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
                with _autocast(cfg, run.device):
                    loss = loss_of(model(**batch)) + sum(term(model) for term in extra_losses)
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
                _checkpoint(out, step, model, optimizer, scheduler, cfg, run, history, len(train_data))
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
                history: dict, n: int) -> None:
    rng = capture_rng(run.world, run.device)  # a collective: every rank takes part
    if run.rank != 0:
        return
    state = {"step": step, "micro_batches": step * cfg.grad_accum, "data": _data_key(cfg, run, n),
             "trainable": [name for name, p in model.named_parameters() if p.requires_grad], "history": history}
    save_checkpoint(out, step, model, optimizer, scheduler, state, rng, keep=cfg.keep_checkpoints)


def _resume_state(resume, cfg: TrainConfig, model, optimizer, scheduler, run: Dist, n: int) -> dict:
    """Step 0, or the checkpoint's state after loading its weights, optimizer, scheduler and RNG."""
    fresh = {"step": 0, "history": {"train_loss": [], "eval": []}}
    if not resume:
        return fresh
    path = latest_checkpoint(cfg.output_dir) if resume is True else Path(resume)
    if path is None:
        if run.rank == 0:
            print(f"resume: no checkpoint in {cfg.output_dir} yet, starting from step 0")
        return fresh
    state = load_checkpoint(path, model, optimizer, scheduler, run.rank)
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
