"""AdamR (DAREx-L2, methods.md §8.1 check 5): AdamW with the decoupled decay applied to θ − θ_pre."""

from __future__ import annotations

import pytest
import torch

from peftkit.optim import AdamR


def _grads(steps: int, shape) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def test_adamr_step_equals_adamw_on_the_delta():
    """θ_pre + AdamW(φ = θ − θ_pre) with the same gradients and decay == AdamR(θ), step after step."""
    pre = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    theta = torch.nn.Parameter(pre + 0.3)
    phi = torch.nn.Parameter(theta.detach() - pre)
    ours = AdamR([theta], lr=0.1, weight_decay=0.5, initial=[pre])
    reference = torch.optim.AdamW([phi], lr=0.1, weight_decay=0.5)
    for grad in _grads(4, (5, 3)):
        theta.grad, phi.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
        assert torch.allclose(theta.detach(), pre + phi.detach(), atol=1e-6)
    assert ours.param_groups[0]["weight_decay"] == 0.5  # restored after each step


def test_adamr_pulls_toward_the_initial_values_not_zero():
    theta = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = AdamR([theta], lr=0.1, weight_decay=1.0)  # θ_pre = 2 (the values at construction)
    theta.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(theta.detach(), torch.full((4,), 2.0))  # AdamW would shrink it to 1.8
    plain = torch.nn.Parameter(torch.full((4,), 2.0))
    adamw = torch.optim.AdamW([plain], lr=0.1, weight_decay=1.0)
    plain.grad = torch.zeros(4)
    adamw.step()
    assert torch.allclose(plain.detach(), torch.full((4,), 1.8))


def test_adamr_checks_initial_values():
    with pytest.raises(ValueError, match="one per parameter"):
        AdamR([torch.nn.Parameter(torch.zeros(2))], initial=[])
