"""AdamR: AdamW whose decoupled weight decay pulls toward the initial values (DAREx-L2).

Deng et al., 2024, "DARE the Extreme" (arXiv:2410.09344), §DAREx-L2: fine-tune with decoupled L2
regularisation of the delta δ = θ − θ_pre, so deltas stay small and centred and survive DARE's pruning
at high drop rates:

    θ ← θ − η λ (θ − θ_pre),   then the Adam update   θ ← θ − η m̂ / (√v̂ + ε).

With θ_pre = 0 this is AdamW exactly; in general it is AdamW run on φ = θ − θ_pre (Adam's update
depends on the gradients only, which are the same for θ and φ). θ_pre is each parameter's value when
the optimizer is built, or `initial` (a list of tensors in parameter order) when given.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class AdamR(torch.optim.AdamW):
    """AdamW with the decay applied to θ − θ_pre instead of θ (the regulariser of DAREx-L2).

    Args:
        params: parameters or parameter groups, as for AdamW.
        weight_decay: λ, the strength of the pull toward θ_pre (AdamW's default 1e-2).
        initial: θ_pre for each parameter, in order; default: a copy of the parameters now.
        **kwargs: lr, betas, eps, amsgrad, ... as for AdamW (not `decoupled`-style flags it lacks).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 1e-2,
                 initial: Iterable[torch.Tensor] | None = None, **kwargs) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)
        self.initial: dict[torch.Tensor, torch.Tensor] = {}
        """θ_pre per parameter; `state_dict` carries it as each parameter's "anchor" (so a checkpoint resumes
        toward the same values), and AdamW's own state stays as AdamW keeps it."""
        flat = [p for group in self.param_groups for p in group["params"]]
        starts = list(initial) if initial is not None else [p.detach() for p in flat]
        if len(starts) != len(flat):
            raise ValueError(f"initial has {len(starts)} tensors for {len(flat)} parameters; give one per parameter")
        for p, start in zip(flat, starts, strict=True):
            if start.shape != p.shape:
                raise ValueError(f"an initial value has shape {tuple(start.shape)}, its parameter {tuple(p.shape)}")
            self.initial[p] = start.detach().clone().to(p.device, p.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        """θ ← θ − η λ (θ − θ_pre) for every parameter with a gradient, then AdamW's step without its decay."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decays = []
        for group in self.param_groups:
            decays.append(group["weight_decay"])
            for p in group["params"]:
                if p.grad is not None and group["weight_decay"] != 0:
                    p.sub_(p - self.initial[p], alpha=group["lr"] * group["weight_decay"])
            group["weight_decay"] = 0.0
        try:
            super().step()
        finally:
            for group, decay in zip(self.param_groups, decays, strict=True):
                group["weight_decay"] = decay
        return loss

    def state_dict(self) -> dict:
        """AdamW's state plus θ_pre per parameter ("anchor"), so a resumed run decays toward the same values."""
        out = super().state_dict()
        flat = [p for group in self.param_groups for p in group["params"]]
        for index, p in enumerate(flat):
            out["state"].setdefault(index, {})["anchor"] = self.initial[p]
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore AdamW's state and take θ_pre from the saved anchors (a parameter without one keeps its own)."""
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        anchors = {int(k): v.pop("anchor") for k, v in state.items() if "anchor" in v}
        super().load_state_dict({**state_dict, "state": {k: v for k, v in state.items() if v}})
        flat = [p for group in self.param_groups for p in group["params"]]
        for index, anchor in anchors.items():
            self.initial[flat[index]] = anchor.detach().clone().to(flat[index].device, flat[index].dtype)
