"""PETALface on the vision demo (peftkit/train/petalface.py): the methods.md §2.12 checks on a tiny ViT
and a single linear layer, the blur helper, and a smoke run of the joint two-LoRA training."""

from __future__ import annotations

import time
from functools import partial

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core.adapters import get_state
from peftkit.train import petalface as pf
from peftkit.train.vision import VisionConfig, build_vision_model

torch.set_num_threads(1)  # tiny models: a second thread only contends on the shared 2-core machine


def _perturb(model: nn.Module, seed: int) -> None:
    """Move every trainable parameter (both LoRAs, the head) away from its init, so the checks can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _tiny_petalface(perturbed: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = VisionConfig(dim=16, depth=2, heads=2, patch_size=7, mlp_ratio=2.0)
    model = pf.add_loras(build_vision_model(config).eval(), two_loras=True, r=2, lora_alpha=4.0)
    if perturbed:
        _perturb(model, seed=3)
    return model


def _items(n: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x, alpha = torch.randn(n, 1, 28, 28, generator=g), torch.rand(n, generator=g)
    return [{"pixel_values": x[i], "labels": torch.tensor(i % 10), "alpha": alpha[i]} for i in range(n)]


def _logits(model: nn.Module, items: list[dict], alpha: float | None = None) -> torch.Tensor:
    batch = pf.mixture_collate(items, alpha=alpha)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits


def test_alpha_0_is_lora_low_alone_and_alpha_1_lora_high_alone():
    model, items = _tiny_petalface(), _items()
    mixed_0, mixed_1 = _logits(model, items, alpha=0.0), _logits(model, items, alpha=1.0)
    x = torch.stack([it["pixel_values"] for it in items])
    with torch.no_grad():
        peftkit.set_active(model, pf.LOW)
        low = model(pixel_values=x).logits
        peftkit.set_active(model, pf.HIGH)
        high = model(pixel_values=x).logits
    torch.testing.assert_close(mixed_0, low, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed_1, high, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(low, high, atol=1e-3)  # the two LoRAs differ, so the check can fail


def test_identity_at_init():
    model, items = _tiny_petalface(perturbed=False), _items()
    x = torch.stack([it["pixel_values"] for it in items])
    with torch.no_grad(), peftkit.disabled(model):
        base = model(pixel_values=x).logits
    torch.testing.assert_close(_logits(model, items), base, atol=1e-6, rtol=1e-6)  # B = 0 in both LoRAs


def test_output_linear_in_alpha_per_layer():
    """y(a) = W0 x + (1 - a) LoRA_low(x) + a LoRA_high(x): per layer, y(a) = (1 - a) y(0) + a y(1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5))
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["0"]), name=pf.LOW)
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["0"]), name=pf.HIGH)
    peftkit.set_active(model, [pf.LOW, pf.HIGH])
    _perturb(model, seed=5)
    x = torch.randn(4, 7)
    names = [(pf.LOW, pf.HIGH)] * 4

    def y(alphas):
        with torch.no_grad():
            return model(x, adapter_names=names, adapter_weights=[(1 - a, a) for a in alphas])

    alphas = [0.0, 0.3, 0.7, 1.0]
    y0, y1, ya = y([0.0] * 4), y([1.0] * 4), y(alphas)
    a = torch.tensor(alphas)[:, None]
    torch.testing.assert_close(ya, (1 - a) * y0 + a * y1, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(y0, y1, atol=1e-3)


@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.0, 2.5])
def test_gaussian_kernel_sums_to_one(sigma):
    kernel = pf.gaussian_kernel(sigma, radius=8)
    assert kernel.shape == (17,)
    torch.testing.assert_close(kernel.sum(), torch.tensor(1.0))
    torch.testing.assert_close(kernel, kernel.flip(0))  # symmetric: no shift of the image


def test_blur_level_0_is_identity_and_higher_levels_smooth():
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(pf.blur(x, torch.zeros(3)), x)
    out = pf.blur(x, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(out[0], x[0])
    roughness = [(img[..., 1:] - img[..., :-1]).abs().mean().item() for img in out]
    assert roughness[0] > roughness[1] > roughness[2]
    # kernel sums to 1 and edges are repeated: a constant image stays constant, so blurring commutes with
    # the affine pixel normalisation
    torch.testing.assert_close(pf.blur(torch.full((1, 1, 28, 28), -0.8), torch.ones(1)),
                               torch.full((1, 1, 28, 28), -0.8))
    torch.testing.assert_close(pf.blur(2 * x + 1, torch.full((3,), 0.7)), 2 * pf.blur(x, torch.full((3,), 0.7)) + 1)


def test_blur_levels_and_alpha():
    levels = pf.blur_levels(100, blurred_fraction=0.5, lowest=0.5, seed=0)
    assert int((levels > 0).sum()) == 50
    assert levels[levels > 0].min() >= 0.5 and levels.max() <= 1.0
    assert torch.equal(levels, pf.blur_levels(100, seed=0))  # seeded
    data = pf.QualityDataset(torch.randn(100, 1, 28, 28), torch.arange(100) % 10, levels)
    torch.testing.assert_close(data.alpha, 1 - levels)  # sharp images: alpha 1
    assert torch.equal(data.blurred, levels > 0)


def _lora_b(model: nn.Module, name: str) -> torch.Tensor:
    """All of adapter `name`'s lora_B tensors, flattened into one (a copy)."""
    layers = get_state(model, name).layers.values()
    return torch.cat([layer.adapter_tensors()["lora_B"].detach().flatten() for layer in layers]).clone()


def test_joint_training_smoke_trains_both_loras_and_the_head():
    started = time.perf_counter()
    torch.manual_seed(0)
    model = pf.add_loras(build_vision_model(VisionConfig(dim=16, depth=2, heads=2, patch_size=7)), two_loras=True,
                         r=2, lora_alpha=4.0)
    levels = pf.blur_levels(32, seed=0)
    data = pf.QualityDataset(torch.randn(32, 1, 28, 28), torch.arange(32) % 10, levels)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_b = {name: _lora_b(model, name) for name in (pf.LOW, pf.HIGH)}
    result = pf.train_adapters(model, data, pf.mixture_collate, steps=4, batch_size=8, lr=1e-2, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for name, b in lora_b.items():  # B starts at 0 in both LoRAs: both moved, so both received gradients
        assert not torch.equal(_lora_b(model, name), b), name
    assert {"head.weight", "head.bias"} <= changed
    assert all("lora" in n or n.startswith("head.") for n in changed), sorted(changed)  # the base stays frozen
    assert result["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    figures = pf.evaluate_quality(model, data, pf.mixture_collate, batch_size=16)
    assert figures["n_sharp"] == 16 and figures["n_blurred"] == 16
    assert 0.0 <= figures["accuracy_blurred"] <= 1.0
    single = pf.add_loras(build_vision_model(VisionConfig(dim=16, depth=2, heads=2, patch_size=7)), two_loras=False,
                          r=2, lora_alpha=4.0)
    one = partial(pf.mixture_collate, names=None)
    pf.train_adapters(single, data, one, steps=2, batch_size=8, lr=1e-2, progress=False)
    assert set(pf.evaluate_quality(single, data, one)) == set(figures)
    assert time.perf_counter() - started < 20
