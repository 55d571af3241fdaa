"""LISA: Layerwise Importance Sampled AdamW (Pan et al., 2024, arXiv:2403.17919).

Full-parameter training of a moving subset of transformer blocks. Every K steps all N_L blocks are
frozen and γ of them are drawn uniformly without replacement (each block is active with probability
p = γ / N_L) and unfrozen; everything outside the blocks (embeddings, final norm, output head) always
trains, as in LMFlow's implementation, which freezes only the block list. The optimizer is plain AdamW
over all parameters: a parameter without a gradient gets no state, and the state of a deactivated block
is dropped, so gradients and AdamW moments exist for embeddings + head + γ blocks only. That is where
the memory saving comes from (LMFlow re-creates the optimizer instead; dropping the state is the same).

Use (peftkit's loop or a plain one):

    lisa = LISA(model, gamma=2, period=20, seed=0)        # freezes all but γ blocks now
    optimizer = torch.optim.AdamW(lisa.parameters(), lr)  # every parameter LISA may activate
    for step, batch in enumerate(loader, start=1):
        model(**batch).loss.backward()
        lisa.step(step, optimizer)          # after backward, before clipping and optimizer.step()
        optimizer.step(); optimizer.zero_grad()

`step(t)` first drops the AdamW state (and any zero-filled gradient) of every block that did not train in
step t, then, when t is a multiple of K, draws the next γ blocks and flips `requires_grad`. The blocks
that trained in step t keep their gradients, so `optimizer.step()` still updates them; the new blocks have
no gradient yet and are skipped by AdamW. Step t's forward and backward therefore always see the blocks
of period ⌊(t - 1) / K⌋, drawn at construction for the first period.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.architectures import describe
from ..core.config import ConfigError
from ..core.layer import AdapterLayer
from ..core.schedule import MethodSchedule


def transformer_blocks(model: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList | nn.Sequential]:
    """The module list of the model's transformer blocks, and its name.

    Found by shape, not by name: the ModuleList / Sequential whose children are all one class (with
    submodules of their own) and hold the most parameters, e.g. Llama `model.layers`, GPT-2
    `transformer.h`, BERT `bert.encoder.layer`. `name` picks one explicitly (an encoder-decoder has two).
    """
    if name is not None:
        blocks = model.get_submodule(name)
        if not isinstance(blocks, nn.ModuleList | nn.Sequential) or len(blocks) == 0:
            raise ConfigError(f"blocks={name!r} of {describe(model)} is a {type(blocks).__name__}, not a non-empty "
                              "nn.ModuleList / nn.Sequential of transformer blocks")
        return name, blocks
    best, best_size = None, 0
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or issubclass(kinds.pop(), AdapterLayer) or not any(True for _ in module[0].children()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (mod_name, module), size
    if best is None:
        raise ConfigError(f"found no list of transformer blocks in {describe(model)} (an nn.ModuleList of one "
                          "block class); name it with blocks='model.layers' or similar")
    return best


def block_parameters(blocks: nn.ModuleList | nn.Sequential) -> list[list[nn.Parameter]]:
    """The parameters of each block (a tensor shared by two blocks is listed under the first)."""
    seen: set[int] = set()
    out = []
    for block in blocks:
        params = [p for p in block.parameters() if id(p) not in seen]
        seen |= {id(p) for p in params}
        out.append(params)
    return out


def optimizer_check(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], who: str) -> None:
    """Raise when `optimizer` does not hold every parameter a schedule may activate."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = sum(id(p) not in held for p in params)
    if missing:
        raise ConfigError(f"{who} may activate {missing} parameters the optimizer does not hold (it was built over "
                          f"the parameters trainable at that moment); build it over `{who.lower()}.parameters()`")


class LISA(MethodSchedule):
    """LISA: γ uniformly drawn transformer blocks train, re-drawn every `period` steps (see the module docstring).

    Args:
        model: a transformers model (or any model with a list of blocks) training its own parameters.
        gamma: γ, the number of active blocks (LMFlow's `lisa_activated_layers`; ms-swift's default 2).
        period: K, steps between two draws (LMFlow's `lisa_interval_steps`, 20).
        seed: seed of the schedule's own generator (the global RNG is never touched).
        blocks: name of the block list, when the structural search (`transformer_blocks`) must be overridden.
    """

    def __init__(self, model: nn.Module, gamma: int = 2, period: int = 20, seed: int = 0,
                 blocks: str | None = None) -> None:
        super().__init__(model)
        if any(isinstance(m, AdapterLayer) for m in model.modules()):
            raise ConfigError("LISA trains the model's own parameters (full fine-tuning of γ blocks); this model "
                              "has adapter layers: use IST to train a moving subset of adapters instead")
        self.blocks_name, block_list = transformer_blocks(model, blocks)
        self.blocks = block_parameters(block_list)
        n = len(self.blocks)
        if not isinstance(gamma, int) or not 1 <= gamma <= n:
            raise ConfigError(f"LISA gamma={gamma!r} must be an integer in [1, {n}]: {describe(model)} has {n} "
                              f"transformer blocks ({self.blocks_name})")
        if not isinstance(period, int) or period < 1:
            raise ConfigError(f"LISA period={period!r} must be a positive integer (steps between two draws)")
        self.gamma, self.period, self.seed = gamma, period, seed
        in_blocks = {id(p) for params in self.blocks for p in params}
        self.always = [p for p in model.parameters() if id(p) not in in_blocks]
        """Embeddings, final norm, head: trained at every step."""
        self.generator = torch.Generator().manual_seed(seed)
        self._checked = False
        for p in self.always:
            p.requires_grad_(True)
        self._activate(self._draw())

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter LISA may train: build the optimizer over these (not over the trainable ones)."""
        return self.always + [p for params in self.blocks for p in params]

    def _draw(self) -> list[int]:
        """γ distinct block indices, uniformly (sorted)."""
        return sorted(torch.randperm(len(self.blocks), generator=self.generator)[: self.gamma].tolist())

    def _activate(self, active: list[int]) -> None:
        self.active = active
        for i, params in enumerate(self.blocks):
            for p in params:
                p.requires_grad_(i in active)

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After backward, before `optimizer.step()`: drop idle blocks' state; draw new blocks at multiples of K."""
        if optimizer is not None:
            if not self._checked:
                optimizer_check(optimizer, self.parameters(), "LISA")
                self._checked = True
            self._drop_idle(optimizer)
        if step % self.period == 0:
            self._activate(self._draw())

    def _drop_idle(self, optimizer: torch.optim.Optimizer) -> None:
        """Free the AdamW moments and gradients of blocks that did not train this step."""
        for i, params in enumerate(self.blocks):
            if i in self.active:
                continue
            for p in params:
                p.grad = None  # a zero-filled gradient would still let AdamW move p with its momentum
                optimizer.state.pop(p, None)

    def state_dict(self) -> dict:
        """The generator's state and the active blocks (what the next steps depend on)."""
        return {"generator": self.generator.get_state(), "active": list(self.active)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`: the same blocks train, and the same blocks are drawn next."""
        active = [int(i) for i in state["active"]]
        if len(active) != self.gamma or not all(0 <= i < len(self.blocks) for i in active):
            raise ConfigError(f"LISA state has active blocks {active}, not {self.gamma} of {len(self.blocks)}")
        self.generator.set_state(state["generator"])
        self._activate(sorted(active))
