"""The loop's guard against NaN and infinity: in the loss, the gradients, and the weights after a step.

A finite loss does not make a finite update: with a huge learning rate, or an infinite gradient and
clipping off, the optimizer step itself can overflow the weights while the loss of that step looked
fine, and the next checkpoint would then hold NaN or inf as "the last good checkpoint". So each step
checks three things, each one fused pass over the trainable tensors and no extra synchronisation
beyond one `.item()`:

    loss and gradients   before the cross-rank average, the hooks and the optimizer step
                         (one all-reduce carries the loss and a "some gradient is not finite" flag)
    weights              after the optimizer step, before anything can be evaluated or saved

The max-abs norm (`ord=inf`) is the test: it is NaN or inf exactly when some element is, and unlike
the L2 norm it cannot overflow on large finite values. Under torchrun every rank takes part in the
same reductions, so every rank stops at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import Dist


class NonFiniteLossError(RuntimeError):
    """The loss, a gradient or (after the update) a weight became NaN or infinite; training stopped.

    `what` is "loss", "gradient" or "weights"; `names` the parameters concerned (gradients, weights);
    `checkpoint` the newest checkpoint this run wrote or resumed from, which holds finite weights.
    """

    def __init__(self, step: int, loss: float, checkpoint: Path | None, what: str = "loss",
                 names: list[str] | None = None) -> None:
        self.step, self.loss, self.checkpoint, self.what, self.names = step, loss, checkpoint, what, names or []
        where = (f"The last good checkpoint, {checkpoint}, is untouched: lower lr or check the data, then "
                 "train again with resume=True." if checkpoint else "No checkpoint was written before it.")
        shown = ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "") or "a parameter on another rank"
        if what == "weights":
            text = (f"the optimizer update of step {step} made trainable weights NaN or infinite ({shown}) although "
                    f"the loss ({loss:.4g}) and the gradients were finite: the learning rate is too large for them. "
                    "The model holds those weights now and nothing was saved from them.")
        elif what == "gradient":
            text = (f"the gradient of {shown} is NaN or infinite at step {step} (loss {loss:.4g}); training stopped "
                    f"before that step's optimizer update, so the model holds the weights of step {step - 1}.")
        else:
            text = (f"loss is {loss} at step {step}; training stopped before that step's optimizer update, "
                    f"so the model holds the weights of step {step - 1}.")
        super().__init__(f"{text} {where}")


def nonfinite(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """A 0-dim bool tensor, True when any element of `tensors` is NaN or infinite; does not synchronise."""
    tensors = [t.coalesce().values() if t.is_sparse else t for t in tensors
               if t is not None and t.numel() and t.is_floating_point()]
    if not tensors:
        return torch.zeros((), dtype=torch.bool)
    device = tensors[0].device
    norms = torch._foreach_norm(tensors, math.inf)  # one fused kernel per device and dtype
    return ~torch.isfinite(torch.stack([n.to(device, torch.float32) for n in norms])).all()


def nonfinite_names(model: nn.Module, grads: bool) -> list[str]:
    """Trainable parameters whose value (or gradient) holds NaN or inf; for the error message only."""
    found = []
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if p.requires_grad and t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            found.append(name)
    return found


def loss_and_gradients(step_loss: torch.Tensor, params: list[nn.Parameter], run: Dist) -> tuple[float, bool]:
    """The step's loss averaged over ranks, and whether every rank's gradients are finite (one message)."""
    packed = torch.stack([step_loss.float(), nonfinite(p.grad for p in params).to(step_loss.device, torch.float32)])
    if run.world > 1:
        dist.all_reduce(packed)
        packed[0] /= run.world
    loss, bad = packed.tolist()
    return loss, bad == 0


def weights_finite(params: list[nn.Parameter], run: Dist) -> bool:
    """Whether every trainable weight is finite on every rank."""
    bad = nonfinite(params).to(run.device, torch.float32)
    if run.world > 1:
        dist.all_reduce(bad)
    return bad.item() == 0
