"""LoRA-MGPO: momentum-guided perturbation of the frozen weight (arXiv:2502.14538 v2/v3,
EMNLP 2025 Findings), peftkit's answer to LoRA-GGPO (methods.md §7.5).

Which paper: arXiv 2502.14538 v1 was titled LoRA-GGPO (gradient-guided perturbation), but its method
text was not available to us; v2/v3 of the same record, by the same authors, is LoRA-MGPO, and that
published method is what is implemented here. We followed the authors' trainer (llm172/LoRA-MGPO,
`lora_mgpo/trainer.py`, which says it follows the paper's method section); the provisional spec of
§7.5 (random per-row noise) is not what the paper does.

For each LoRA layer l (W = W0 + s B A), before the forward pass of step t:

    v_l   = s (m_B A + B m_A)                          Adam's first moment (exp_avg) in weight space
    ḡ_l   = β ḡ_l + (1 - β) ‖s (∇_B A + B ∇_A)‖_F      EMA of the layer's weight-space gradient norm
    ε_l   = -ρ · v_l / (‖v_l‖_F + δ) · min(1 / (ḡ_l + δ), 10),   δ = 1e-12

and the step's single forward/backward runs at W0 + ε_l + s B A; the gradients of A and B taken there
drive the optimizer step. Choices, as in the authors' trainer:

* m_A, m_B, A and B are the values after step t-1's optimizer step (exp_avg without bias correction;
  SGD's momentum_buffer where there is no exp_avg). Step 1 has no momentum: no perturbation.
* ḡ_l is taken right after backward, before clipping, with the factors the gradient was taken at; its
  first value is the first norm itself (no bias correction). Until ḡ_l exists the factor is 1.
* Norms are per layer (Frobenius over the layer's d_out x d_in weight), not global; a layer whose
  ‖v_l‖ <= δ is not perturbed.
* Profiles from the authors' README: NLU (T5-base, GLUE) ρ = 0.05, Adam β1 = 0.9, β = 0.9 (the
  defaults here); NLG (LLaMA-2-7B) ρ = 0.01, Adam β1 = 0.8, β = 0.8. β1 is the optimizer's own.

Choices of peftkit:

* ε never lands in a parameter: a forward hook on each LoRA layer adds ε_l x (no bias) to its output.
  ε_l = -ρ c s/(‖v‖+δ) U V has rank <= 2r (U = [m_B, B], V = [A; m_A]), so it is kept and applied
  factored, added into the layer's output by LoRA's own kernel (`lowrank.add_low_rank` with factors V,
  kU, k the scalar in front; it saves only (tokens, 2r) more), and ‖U V‖_F comes from the 2r x 2r Gram
  matrices: no d_out x d_in tensor is formed. U and V are detached copies: no gradient
  reaches A or B through ε (as with the authors' no-grad weight write), dL/dx does see it.
* ε_l is made lazily, at the layer's first training forward after `step()`, from the optimizer state
  then current (so after `optimizer.step()`), and reused for every micro-batch of the step. ḡ_l is
  updated once per optimizer step from the accumulated gradient (the authors' trainer updates it per
  micro-batch). Forwards in eval mode, under no_grad, or with the adapter off or merged see no ε.
* ρ = 0 registers no hook and touches nothing: plain LoRA, bit for bit.
* The step's loss (what a loop logs) is the one at W0 + ε; ε points down the momentum, so it reads lower
  than the unperturbed model's loss. Evaluate in eval mode for the model itself.

Use (peftkit's loop: `schedule: mgpo`, fields mgpo_rho / mgpo_beta; or a plain loop):

    optimizer = torch.optim.AdamW(trainable, lr)
    mgpo = MGPO(model, optimizer, rho=0.05, beta=0.9)
    for step, batch in enumerate(loader, start=1):
        model(**batch).loss.backward()      # one forward/backward at W0 + ε + s B A
        mgpo.step(step, optimizer)          # after backward, before clipping and optimizer.step()
        optimizer.step(); optimizer.zero_grad()
    mgpo.remove()                           # detach the hooks when done
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..core.config import ConfigError
from ..core.layer import AdapterLayer, adapter_layers
from ..core.schedule import MethodSchedule
from ..methods.lora import LoRALayer, LoRALinear
from ..methods.lowrank import add_low_rank
from .lisa import optimizer_check

DELTA = 1e-12
"""δ of the docstring: keeps the two divisions finite (the authors' `mgpo_eps`)."""

MAX_SCALE = 10.0
"""Upper clamp of the adaptive factor 1 / ḡ (the authors' trainer)."""


def product_norm(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖u v‖_F for u (m, k), v (k, n) without forming u v: sqrt(Σ (uᵀu) ⊙ (v vᵀ)), in float64 (k x k Grams)."""
    u, v = u.double(), v.double()
    return ((u.T @ u) * (v @ v.T)).sum().clamp_min(0.0).sqrt()


def supported(layer: nn.Module) -> bool:
    """LoRA layers whose update is exactly s B A on nn.Linear / GPT-2 Conv1D (LoRA, rsLoRA, PiSSA, PEGO)."""
    kind = type(layer)
    return (isinstance(layer, LoRALinear) and kind.adapt is LoRALinear.adapt
            and kind.delta_weight is LoRALayer.delta_weight and kind.merged_weight is AdapterLayer.merged_weight)


class MGPO(MethodSchedule):
    """LoRA-MGPO: each step's forward/backward at W0 + ε + s B A, ε from the Adam momentum (module docstring).

    Args:
        model: a model with LoRA layers on nn.Linear / GPT-2 Conv1D (every trainable adapter layer must be one).
        optimizer: the optimizer over the LoRA factors; its exp_avg (or momentum_buffer) gives ε's direction.
        rho: ρ, the perturbation radius (before the adaptive factor); 0 is plain LoRA.
        beta: β, the decay of the EMA of each layer's weight-space gradient norm.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rho: float = 0.05,
                 beta: float = 0.9) -> None:
        super().__init__(model)
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not math.isfinite(rho) or rho < 0:
            raise ConfigError(f"MGPO rho={rho!r} must be a finite number >= 0 (0 is plain LoRA; the paper uses "
                              "0.05 for NLU, 0.01 for NLG)")
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
            raise ConfigError(f"MGPO beta={beta!r} must be in [0, 1) (the decay of the gradient-norm EMA)")
        self.rho, self.beta = float(rho), float(beta)
        self.layers = self._find_layers(model)
        if optimizer is None or not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"MGPO reads the optimizer's momentum and needs the optimizer, got {optimizer!r}")
        optimizer_check(optimizer, [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)],
                        "MGPO")
        self.optimizer = optimizer
        self.gbar: dict[str, torch.Tensor] = {}
        """ḡ_l by layer name: float32 0-d tensors on the layer's device."""
        self._eps: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        """The current step's (V, kU) by layer name (None: no perturbation this step); empty after `step()`."""
        self._handles = []
        if self.rho > 0:
            self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]

    @staticmethod
    def _find_layers(model: nn.Module) -> dict[str, LoRALinear]:
        trained = {name: layer for name, layer in adapter_layers(model).items()
                   if any(p.requires_grad for p in layer.adapter_parameters().values())}
        others = sorted({type(layer).__name__ for layer in trained.values() if not supported(layer)})
        if others:
            raise ConfigError(f"MGPO perturbs LoRA layers on nn.Linear / GPT-2 Conv1D (update s B A); this model also "
                              f"trains {', '.join(others)}, which it does not support: target linear layers with "
                              "LoRAConfig (or freeze the others)")
        if not trained:
            found = sorted({type(layer).__name__ for layer in adapter_layers(model).values()}) or ["none"]
            raise ConfigError(f"MGPO needs trainable LoRA layers on nn.Linear / GPT-2 Conv1D; adapter layers in "
                              f"this model: {', '.join(found)}. Apply LoRAConfig first")
        return trained

    def remove(self) -> None:
        """Detach the forward hooks (the model is plain LoRA afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._eps = [], {}

    def _hook(self, name: str):
        def add_perturbation(layer: LoRALinear, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not (layer.training and torch.is_grad_enabled() and layer.enabled and layer.is_active
                    and not layer.merged):
                return None
            if name not in self._eps:
                self._eps[name] = self.perturbation(name, layer)
            factors = self._eps[name]
            if factors is None:
                return None
            v, ku = factors  # (2r, d_in), (d_out, 2r)
            return add_low_rank(output, args[0], v, ku, 1.0)  # + ε x = kU (V x), in place where dtypes allow

        return add_perturbation

    def _momentum(self, param: nn.Parameter) -> torch.Tensor | None:
        state = self.optimizer.state.get(param)
        if not state:
            return None  # no optimizer step yet
        moment = state.get("exp_avg", state.get("momentum_buffer"))
        if moment is None or moment.shape != param.shape:
            have = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
            raise ConfigError(f"MGPO needs the optimizer's first moment of each LoRA factor, shaped like it "
                              f"{tuple(param.shape)} (AdamW's exp_avg or SGD's momentum_buffer); "
                              f"{type(self.optimizer).__name__} holds {have}. Use AdamW (or SGD with momentum)")
        return moment

    @torch.no_grad()
    def perturbation(self, name: str, layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(V, kU) with ε_l = kU V, or None before the optimizer holds a momentum (the first step)."""
        m_a, m_b = self._momentum(layer.lora_A), self._momentum(layer.lora_B)
        if m_a is None or m_b is None:
            return None
        a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
        u = torch.cat([m_b.to(b.dtype), b], dim=1)  # (d_out, 2r)
        v = torch.cat([a, m_a.to(a.dtype)], dim=0)  # (2r, d_in): v_l = s u v
        norm = abs(s) * product_norm(u, v)
        gbar = self.gbar.get(name)
        scale = 1.0 if gbar is None else torch.reciprocal(gbar.double() + DELTA).clamp(max=MAX_SCALE)
        k = torch.where(norm > DELTA, -self.rho * s * scale / (norm + DELTA), 0.0)  # no host sync
        return v, u * k.to(u.dtype)

    @torch.no_grad()
    def update_gradient_norms(self) -> None:
        """ḡ_l ← β ḡ_l + (1 - β) ‖s (∇_B A + B ∇_A)‖_F for every layer with gradients."""
        for name, layer in self.layers.items():
            g_a, g_b = layer.lora_A.grad, layer.lora_B.grad
            if g_a is None or g_b is None:
                continue
            a, b = layer.lora_A.detach(), layer.lora_B.detach()
            norm = (abs(layer.scaling) * product_norm(torch.cat([g_b, b], 1), torch.cat([a, g_a], 0))).float()
            prev = self.gbar.get(name)
            self.gbar[name] = norm if prev is None else self.beta * prev + (1.0 - self.beta) * norm

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After backward, before clipping and `optimizer.step()`: update ḡ; the next forward makes a new ε."""
        if self.rho == 0:
            return
        if optimizer is not None and optimizer is not self.optimizer:
            optimizer_check(optimizer, [p for la in self.layers.values() for p in (la.lora_A, la.lora_B)], "MGPO")
            self.optimizer = optimizer
        self.update_gradient_norms()
        self._eps = {}

    def state_dict(self) -> dict:
        """ḡ_l of every layer that has one (ε itself is re-derived from the optimizer state and the factors)."""
        return {f"gbar.{name}": value for name, value in self.gbar.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""
        names = {key.removeprefix("gbar."): value for key, value in state.items()}
        unknown = sorted(set(names) - set(self.layers))
        if unknown or any(not key.startswith("gbar.") for key in state):
            raise ConfigError(f"MGPO state names layers this model does not train with LoRA: {unknown[:5]} (keys "
                              f"{sorted(state)[:5]}); resume with the same adapter targets")
        self.gbar = {name: torch.as_tensor(value, dtype=torch.float32).to(self.layers[name].lora_A.device)
                     for name, value in names.items()}
        self._eps = {}
