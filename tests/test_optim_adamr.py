"""AdamR (DAREx-L2, methods.md §8.1 check 5): AdamW with the decoupled decay applied to θ − θ_pre."""

from __future__ import annotations

import pytest
import torch

import peftkit
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


class _StopAt:
    """Interrupts a run after `step` optimizer steps (as a killed process would, after its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, step, model, optimizer) -> None:
        if step >= self.step:
            raise KeyboardInterrupt


def test_decay_to_init_trains_with_adamr_and_resumes_toward_the_same_anchors(tmp_path):
    """TrainConfig(decay_to_init=True) is DAREx-L2: the checkpoint carries the starting values, so a resumed
    run equals an uninterrupted one (with anchors re-taken at resume it would not)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from peftkit.train.loop import train

    from train_toy import base_classifier, lora_classifier, stack, toy_config, toy_data

    whole = lora_classifier()
    cfg = toy_config(tmp_path / "whole", max_steps=12, save_every=4, decay_to_init=True, weight_decay=0.5)
    train(whole, toy_data(64), None, cfg, stack)
    cut = toy_config(tmp_path / "cut", max_steps=12, save_every=4, decay_to_init=True, weight_decay=0.5)
    with pytest.raises(KeyboardInterrupt):
        train(lora_classifier(), toy_data(64), None, cut, stack, callbacks=[_StopAt(9)])
    resumed = base_classifier(0)  # the same base, but the adapter drawn from another seed before the resume
    torch.manual_seed(99)
    peftkit.apply(resumed, peftkit.LoRAConfig(r=4, alpha=8, targets=["fc1", "fc2"], modules_to_save=["head"]))
    train(resumed, toy_data(64), None, cut, stack, resume=True)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(Exception, match="weight_decay > 0"):
        toy_config(tmp_path / "x", decay_to_init=True, weight_decay=0.0)
