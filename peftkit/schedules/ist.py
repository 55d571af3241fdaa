"""IST: Importance-aware Sparse Tuning (Yao et al., 2024, "Layer-wise Importance Matters: Less Memory for
Better Performance in Parameter-efficient Fine-tuning of Large Language Models", arXiv:2410.11772).

A plug-in for any per-layer adapter (LoRA, DoRA, bottleneck adapters ...): at each step only the adapters
of N_u transformer blocks train. Blocks are drawn by a learned score s ∈ R^{N_L} (init 0; a high s_i means
block i is *less* important):

    active set      multinomial(σ(−s), N_u) without replacement, every step
    score update    every T_u steps, n_rl trials k on one held-out batch: draw S_k ~ multinomial(σ(s), N_s),
                    N_s = ⌊N_L / 2⌋ (distinct from the earlier S_j), multiply those blocks' adapter scaling by
                    0.25 ("response suppression"), take the eval-mode loss ℓ_k; then with p = σ(s) before
                    the update,
                        R_k = exp(−ℓ_k) − mean_j exp(−ℓ_j),   s_i += lr_rl Σ_{k: i ∈ S_k} R_k p_i (1 − p_i)
                    and the scalings are restored.

Defaults follow the authors' `ist.py` (ISTCallback): N_u = ⌊N_L/4⌋, N_s = ⌊N_L/2⌋ (both at least 1 here),
T_u = 10, n_rl = 3, lr_rl = 10, factor 0.25. A layer without a numeric `scaling` is suppressed by a forward
hook that returns y_base + 0.25 (y − y_base), the same thing for an additive adapter. Adapter parameters
outside the blocks (a trained head, embedding adapters) are left as they are.

Timing in a loop: `ist.step(t, optimizer)` runs after `loss.backward()` and before `optimizer.step()`. It
clears leftover gradients of blocks that did not train in step t, runs the score update when t is a multiple
of T_u (the authors run it before step t + 1, after the optimizer step: here it sees the weights before step
t's update), then draws the blocks of step t + 1 and flips `requires_grad`. The blocks of step 1 are drawn at
construction. Unlike LISA, the AdamW state of idle adapters is kept (as in the authors' Trainer), so a block
drawn again continues with its moments. `detach()` gives every adapter parameter back its `requires_grad`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from ..core.architectures import describe
from ..core.config import ConfigError
from ..core.layer import AdapterLayer
from ..core.schedule import MethodSchedule
from .lisa import optimizer_check, transformer_blocks


def score_update(scores: torch.Tensor, sets: Sequence[Sequence[int]], losses: Sequence[float],
                 lr: float) -> torch.Tensor:
    """IST's REINFORCE step: s_i + lr Σ_{k: i ∈ S_k} (exp(−ℓ_k) − mean_j exp(−ℓ_j)) σ(s_i)(1 − σ(s_i)).

    σ is taken at the scores before the update, for every trial (as the authors' code does).
    """
    e = torch.tensor([math.exp(-loss) for loss in losses], dtype=torch.float64)
    rewards = (e[:, None] - e[None, :]).mean(1)  # = e_k - mean(e), and exactly 0 when all losses are equal
    p = scores.double().sigmoid()
    new = scores.double().clone()
    for reward, chosen in zip(rewards, sets, strict=True):
        idx = torch.as_tensor(list(chosen), dtype=torch.long)
        new[idx] += lr * reward * p[idx] * (1 - p[idx])
    return new.to(scores.dtype)


class IST(MethodSchedule):
    """IST over the per-layer adapters already applied to `model` (see the module docstring).

    Args:
        model: a model with a per-layer adapter (peftkit.apply with LoRA, DoRA, ...).
        num_update: N_u, blocks whose adapters train per step (default ⌊N_L/4⌋, at least 1).
        num_suppress: N_s, blocks suppressed per trial (default ⌊N_L/2⌋, at least 1).
        update_interval: T_u, steps between score updates (0: never update, uniform sampling).
        trials: n_rl, suppression trials per update.
        lr_rl: the score's learning rate.
        suppression: factor on a suppressed block's adapter output (its scaling).
        seed: seed of the schedule's own generator (the global RNG is never touched).
        eval_batch: keyword inputs of the held-out batch; the loss is `model(**eval_batch).loss`.
        eval_loss: instead, `eval_loss(model) -> loss` (e.g. drawing a fresh batch each call, as the authors do).
        blocks: name of the block list, when `lisa.transformer_blocks` must be overridden.
    """

    def __init__(self, model: nn.Module, num_update: int | None = None, num_suppress: int | None = None,
                 update_interval: int = 10, trials: int = 3, lr_rl: float = 10.0, suppression: float = 0.25,
                 seed: int = 0, eval_batch: dict | None = None, eval_loss: Callable[[nn.Module], object] | None = None,
                 blocks: str | None = None) -> None:
        super().__init__(model)
        self.blocks_name, block_list = transformer_blocks(model, blocks)
        self.layers, self.params = self._adapters_per_block(model, block_list)
        n = len(self.params)
        self.num_update = max(1, n // 4) if num_update is None else num_update
        self.num_suppress = max(1, n // 2) if num_suppress is None else num_suppress
        self._validate(model, n, update_interval, trials, eval_batch, eval_loss)
        self.update_interval, self.trials, self.lr_rl, self.suppression = update_interval, trials, lr_rl, suppression
        self.eval_batch, self.eval_loss = eval_batch, eval_loss
        self.scores = torch.zeros(n)
        self.updates = 0
        """Score updates done so far."""
        self.generator = torch.Generator().manual_seed(seed)
        self._checked = False
        self._activate(self._draw(-self.scores, self.num_update))

    @staticmethod
    def _adapters_per_block(model: nn.Module, block_list) -> tuple[list[list[AdapterLayer]], list[list[nn.Parameter]]]:
        """Adapter layers and trainable adapter parameters of each block that has any (the adapted layers)."""
        layers, params = [], []
        for block in block_list:
            found = [m for m in block.modules() if isinstance(m, AdapterLayer)]
            trainable = [p for m in found for p in m.adapter_parameters().values() if p.requires_grad]
            if trainable:
                layers.append(found)
                params.append(list({id(p): p for p in trainable}.values()))
        if not params:
            raise ConfigError(f"IST trains a moving subset of per-layer adapters, and {describe(model)} has no "
                              "trainable adapter layer in its blocks; apply one first (peftkit.apply(model, "
                              "LoRAConfig(...)))")
        return layers, params

    def _validate(self, model: nn.Module, n: int, interval: int, trials: int, batch, loss) -> None:
        for name, value in (("num_update", self.num_update), ("num_suppress", self.num_suppress)):
            if not isinstance(value, int) or not 1 <= value <= n:
                raise ConfigError(f"IST {name}={value!r} must be an integer in [1, {n}]: {describe(model)} has {n} "
                                  f"blocks with a trainable adapter")
        if not isinstance(interval, int) or interval < 0:
            raise ConfigError(f"IST update_interval={interval!r} must be 0 (no score updates) or a positive integer")
        if interval and math.comb(n, self.num_suppress) < trials:
            raise ConfigError(f"IST needs {trials} distinct sets of {self.num_suppress} of {n} blocks per update and "
                              f"there are {math.comb(n, self.num_suppress)}; lower trials or num_suppress")
        if interval and (batch is None) == (loss is None):
            raise ConfigError("IST's score update needs exactly one of eval_batch (model(**eval_batch).loss) or "
                              "eval_loss(model); pass update_interval=0 to sample blocks uniformly without one")

    def parameters(self) -> list[nn.Parameter]:
        """Every adapter parameter IST may activate: build the optimizer over these (or over all adapters)."""
        return [p for params in self.params for p in params]

    def _draw(self, logits: torch.Tensor, count: int) -> list[int]:
        """`count` distinct blocks drawn with probabilities ∝ σ(logits) (sorted)."""
        return sorted(torch.multinomial(logits.sigmoid(), count, generator=self.generator).tolist())

    def _activate(self, active: list[int]) -> None:
        self.active = active
        for i, params in enumerate(self.params):
            for p in params:
                p.requires_grad_(i in active)

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After backward, before `optimizer.step()`: scores every T_u steps, then the blocks of the next step."""
        if optimizer is not None and not self._checked:
            optimizer_check(optimizer, self.parameters(), "IST")
            self._checked = True
        for i, params in enumerate(self.params):
            if i not in self.active:
                for p in params:
                    p.grad = None  # zero-filled by zero_grad(set_to_none=False): AdamW would move it by momentum
        if self.update_interval and step % self.update_interval == 0:
            self.update_scores()
        self._activate(self._draw(-self.scores, self.num_update))

    @torch.no_grad()
    def update_scores(self) -> None:
        """n_rl suppression trials on the held-out batch, then `score_update`."""
        sets: list[list[int]] = []
        while len(sets) < self.trials:
            chosen = self._draw(self.scores, self.num_suppress)
            if chosen not in sets:
                sets.append(chosen)
        losses = []
        with _eval_mode(self.model):
            for chosen in sets:
                with self.suppressed(chosen):
                    losses.append(float(self._loss()))
        self.scores = score_update(self.scores, sets, losses, self.lr_rl)
        self.updates += 1

    def _loss(self):
        if self.eval_loss is not None:
            return self.eval_loss(self.model)
        return self.model(**self.eval_batch).loss

    @contextlib.contextmanager
    def suppressed(self, chosen: Sequence[int]) -> Iterator[None]:
        """Scale the adapter output of blocks `chosen` by `suppression`; everything is restored on exit."""
        saved, hooks = [], []
        try:
            for i in chosen:
                for layer in self.layers[i]:
                    scaling = vars(layer).get("scaling")  # the layer's own: not a wrapped attention's `scaling`
                    if isinstance(scaling, int | float) and not isinstance(scaling, bool):
                        saved.append((layer, scaling))
                        layer.scaling = scaling * self.suppression
                    else:
                        hooks.append(layer.register_forward_hook(self._damp, with_kwargs=True))
            yield
        finally:
            for layer, scaling in saved:
                layer.scaling = scaling
            for hook in hooks:
                hook.remove()

    def _damp(self, layer: AdapterLayer, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        """y_base + f (y − y_base): the adapter's contribution scaled by f, for layers without `scaling`."""
        base = layer.base_forward(*args, **kwargs)
        return base + self.suppression * (out - base)

    def detach(self) -> None:
        """Give every adapter parameter IST manages back `requires_grad=True` (as before IST)."""
        for params in self.params:
            for p in params:
                p.requires_grad_(True)

    def state_dict(self) -> dict:
        """Scores, generator, active blocks and the update count."""
        return {"scores": self.scores.clone(), "generator": self.generator.get_state(),
                "active": list(self.active), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`: the same blocks train and the same draws follow."""
        active = [int(i) for i in state["active"]]
        if len(active) != self.num_update or state["scores"].shape != self.scores.shape:
            raise ConfigError(f"IST state has {len(active)} active of {state['scores'].numel()} blocks; this "
                              f"schedule trains {self.num_update} of {self.scores.numel()}")
        self.scores = state["scores"].detach().clone().float()
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])
        self._activate(sorted(active))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() for the trials, then each module's own training flag back."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag
