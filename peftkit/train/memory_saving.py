"""The loop's memory-saving training: the optimizer and the training schedule a TrainConfig names.

    optimizer: adamw   AdamW over the trainable parameters (AdamR with decay_to_init)
               galore  GaLoreAdamW: each 2-D trainable weight projected with galore_rank, the rest plain AdamW
               mezo    MeZO: θ ± εz, two forward passes per step, no backward (`mezo_update`)
    schedule:  lisa    LISA over the blocks of a fully fine-tuned model (method full)
               ist     IST over the per-layer adapters of the model's blocks
               mgpo    LoRA-MGPO: each step at a momentum-guided perturbation of the LoRA layers' bases

A training schedule is a `MethodSchedule` whose `step(step, optimizer)` runs after the backward pass
and the cross-rank gradient average, before clipping and `optimizer.step()` (LISA's and IST's
docstrings); the loop runs it right after the method's own schedule (AdaLoRA's budget), so that one
still sees every gradient of the step. It is built after the optimizer, which therefore holds every
parameter the schedule may activate, and saved with every checkpoint next to the method schedule.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from ..core.adapters import get_state
from ..core.config import ConfigError
from ..core.schedule import MethodSchedule, schedule_for
from ..optim.adamr import AdamR
from ..optim.galore import GaLoreAdamW, galore_param_groups
from ..optim.mezo import MeZO
from ..schedules.ist import IST
from ..schedules.lisa import LISA
from ..schedules.mgpo import MGPO
from .config import TrainConfig
from .distributed import Dist
from .evaluation import autocast_for, loss_of, to_device
from .finite import NonFiniteLossError, nonfinite_names, weights_finite


def optimizer_for(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """cfg.optimizer over the param groups: AdamW (AdamR with decay_to_init), GaLoreAdamW or MeZO."""
    if cfg.optimizer == "galore":
        return galore_optimizer(groups, cfg)
    if cfg.optimizer == "mezo":
        return mezo_optimizer(groups, cfg)
    if cfg.decay_to_init:
        return AdamR(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def galore_optimizer(groups: list[dict], cfg: TrainConfig) -> GaLoreAdamW:
    """GaLoreAdamW over `groups`: each group's 2-D weights projected with galore_rank, the rest plain AdamW."""
    projected = []
    for group in groups:
        extra = {k: v for k, v in group.items() if k != "params"}  # the group's own lr (DePT) carries over
        for part in galore_param_groups(group["params"], rank=cfg.galore_rank, update_proj_gap=cfg.galore_update_gap,
                                        scale=cfg.galore_scale, natural=cfg.galore_natural):
            if part["params"]:
                projected.append({**extra, **part})
    if not any(g["rank"] is not None for g in projected):
        shapes = sorted({tuple(p.shape) for g in groups for p in g["params"]})
        raise ConfigError(f"optimizer=galore projects 2-D weight matrices, and no trainable parameter is one "
                          f"(shapes {shapes[:6]}); use optimizer=adamw for this adapter")
    matrices = [p for g in projected if g["rank"] is not None for p in g["params"]]
    if all(min(p.shape) <= cfg.galore_rank for p in matrices):  # e.g. LoRA's factors under the default rank 128
        warnings.warn(f"galore_rank={cfg.galore_rank} is not below the smaller side of any trainable matrix (largest "
                      f"{max(min(p.shape) for p in matrices)}): GaLore's moments are as large as AdamW's here and "
                      "only the SVDs are added; lower galore_rank or use optimizer=adamw", stacklevel=5)
    return GaLoreAdamW(projected, lr=cfg.lr, weight_decay=cfg.weight_decay)


def mezo_optimizer(groups: list[dict], cfg: TrainConfig) -> MeZO:
    """MeZO (Sparse MeZO with mezo_sparsity > 0) over `groups`, its seed stream seeded with cfg.seed."""
    return MeZO(groups, lr=cfg.lr, eps=cfg.mezo_eps, weight_decay=cfg.weight_decay, sparsity=cfg.mezo_sparsity,
                seed=cfg.seed)


def run_schedules(model: nn.Module, callbacks, total: int, optimizer, cfg: TrainConfig, eval_data_and_collate: tuple,
                  run: Dist) -> dict[str, MethodSchedule | None]:
    """{"method_schedule": the method's own (passed in, or made here), "training_schedule": cfg.schedule's}.

    Call after the optimizer is built (it must hold the blocks LISA freezes). A method schedule
    (AdaLoRA's budget ...) works on gradients, so it is refused with MeZO, which forms none.
    """
    handmade = [type(cb).__name__ for cb in callbacks if isinstance(cb, LISA | IST | MGPO)]
    if handmade:
        raise ConfigError(f"{handmade[0]} came in callbacks; the loop builds its training schedule from "
                          "cfg.schedule (schedule='lisa', 'ist' or 'mgpo' with their lisa_*/ist_*/mgpo_* fields), so that it is "
                          "built over the optimizer's parameters and checkpointed")
    method_schedule = next((cb for cb in callbacks if isinstance(cb, MethodSchedule)), None)
    if method_schedule is None:
        method_schedule = schedule_for(model, total)  # the method's own per-step work, if it has any
    if method_schedule is not None and isinstance(optimizer, MeZO):
        raise ConfigError(f"the adapter's method has a per-step schedule ({type(method_schedule).__name__}) that "
                          "reads gradients, and optimizer=mezo computes none; use adamw or galore with this method")
    training = build_training_schedule(model, cfg, *eval_data_and_collate, run, optimizer)
    return {"method_schedule": method_schedule, "training_schedule": training}


def build_training_schedule(model: nn.Module, cfg: TrainConfig, eval_data, collate_fn: Callable,
                            run: Dist, optimizer: torch.optim.Optimizer | None = None) -> MethodSchedule | None:
    """LISA, IST or MGPO as cfg.schedule names (None for no schedule); clear errors for what cannot work."""
    if cfg.schedule == "mgpo":  # reads the optimizer's momentum from the first perturbed step on (also when resumed)
        return MGPO(model, optimizer, rho=cfg.mgpo_rho, beta=cfg.mgpo_beta)
    if cfg.schedule == "lisa":
        method = get_state(model).config.method
        if method != "full":
            raise ConfigError(f"schedule=lisa fine-tunes whole transformer blocks (method full), and the adapter is "
                              f"{method!r}; use method full, or schedule=ist to train a moving subset of a "
                              "per-layer adapter")
        return LISA(model, gamma=cfg.lisa_gamma, period=cfg.lisa_period, seed=cfg.seed)
    if cfg.schedule == "ist":
        eval_loss = None
        if cfg.ist_update_interval:
            if eval_data is None or not len(eval_data):
                raise ConfigError("schedule=ist scores blocks on held-out data every ist_update_interval steps, and "
                                  "there is no evaluation data; pass eval_data, or set ist_update_interval=0 "
                                  "(uniform sampling)")
            eval_loss = first_batch_loss(eval_data, collate_fn, cfg, run)
        return IST(model, num_update=cfg.ist_num_update, update_interval=cfg.ist_update_interval, seed=cfg.seed,
                   eval_loss=eval_loss)
    return None


def first_batch_loss(eval_data, collate_fn: Callable, cfg: TrainConfig, run: Dist) -> Callable[[nn.Module], float]:
    """`model -> loss` on the first evaluation batch: IST's held-out batch, fixed so a resumed run repeats it."""
    size = min(len(eval_data), cfg.eval_batch_size or cfg.batch_size)
    batch = to_device(collate_fn([eval_data[i] for i in range(size)]), run.device)

    def loss(model: nn.Module) -> float:
        with autocast_for(cfg, run.device):
            return float(loss_of(model(**batch)))

    return loss


def mezo_update(step: int, batches: list[dict], model: nn.Module, params: list[nn.Parameter], optimizer: MeZO,
                scheduler, hooks: tuple[list[Callable], list[Callable]], cfg: TrainConfig, run: Dist,
                last_good) -> tuple[float, float]:
    """One MeZO step on the step's micro-batches: their mean loss at θ + εz and at θ − εz, then the update.

    `hooks` are the callbacks' extra_loss terms (added to both losses) and their on_after_backward
    (run first, with no gradients to read: the loop's per-step hook point). No backward and no clipping;
    the logged loss is MeZO's (ℓ+ + ℓ−)/2. The model runs in eval mode
    (dropout off), so both evaluations see the same function. Under torchrun each loss is averaged over
    ranks inside the closure, so every rank takes the same step from the same seed.

    Raises:
        NonFiniteLossError: ℓ+ or ℓ− is not finite (θ is restored before it propagates), or the update
            made a weight non-finite.
    """
    extra_losses, after_backward = hooks
    for hook in after_backward:
        hook(step, model, optimizer)

    def closure() -> torch.Tensor:
        total = torch.zeros((), device=run.device)
        for batch in batches:
            with autocast_for(cfg, run.device):
                terms = [t for term in extra_losses if (t := term(model)) is not None]
                total += (loss_of(model(**batch)) + sum(terms)).float() / len(batches)
        if run.world > 1:
            dist.all_reduce(total)
            total /= run.world
        if not math.isfinite(value := float(total)):
            raise NonFiniteLossError(step, value, last_good)
        return total

    lr = optimizer.param_groups[0]["lr"]
    with _eval_mode(model):
        loss = float(optimizer.step(closure))
    scheduler.step()
    if not weights_finite(params, run):
        raise NonFiniteLossError(step, loss, last_good, "weights", nonfinite_names(model, grads=False))
    return loss, lr


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() inside, model.train() after: the loop trains in train mode."""
    model.eval()
    try:
        yield
    finally:
        model.train()


def next_batches(data: Iterator[dict], cfg: TrainConfig, run: Dist) -> list[dict]:
    """The step's grad_accum micro-batches, on the run's device."""
    return [to_device(next(data), run.device) for _ in range(cfg.grad_accum)]
