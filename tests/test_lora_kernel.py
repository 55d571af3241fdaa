"""LoRA's one-Function forward (`lowrank.LinearLowRank`: base GEMM + update, dL/dx summed in place) against
a hand-written float64 LoRA, and the cases that keep the two-step path (base(x), then `LowRankAdd`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.methods.lora import LoRAConfig

D_IN, D_OUT, RANK, ALPHA = 12, 10, 3, 6.0


def _layer(bias: bool = True, dropout: float = 0.0, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=bias)).to(dtype)
    peftkit.apply(model, LoRAConfig(r=RANK, alpha=ALPHA, dropout=dropout, targets=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide the update's gradients
    return model, layer


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    """y = x W0^T + b0 + (alpha / r) x A^T B^T, written out."""
    base = layer.base
    y = x @ base.weight.T + (0 if base.bias is None else base.bias)
    return y + (ALPHA / RANK) * (x @ layer.lora_A.T) @ layer.lora_B.T


def _grads(fn, x: torch.Tensor, layer, weight: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (out * weight).sum().backward()
    grads = [out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]
    layer.zero_grad(set_to_none=True)
    return grads


def _check_against_reference(model, layer, shape) -> str:
    x = torch.randn(*shape, D_IN, dtype=layer.lora_A.dtype)
    weight = torch.randn(*shape, D_OUT, dtype=layer.lora_A.dtype)
    kernel = type(model(x.requires_grad_(True)).grad_fn).__name__
    for got, want in zip(_grads(model, x, layer, weight), _grads(lambda t: _reference(layer, t), x, layer, weight),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    return kernel


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5,), (2, 4)])
def test_plain_linear_runs_as_one_function_with_exact_outputs_and_gradients(bias, shape):
    model, layer = _layer(bias=bias)
    assert _check_against_reference(model, layer, shape) == "LinearLowRankBackward"


def test_hooks_dropout_and_a_trainable_bias_keep_the_two_step_path():
    model, layer = _layer()
    handle = layer.base.register_forward_hook(lambda m, i, o: None)
    assert _check_against_reference(model, layer, (4,)) != "LinearLowRankBackward"
    handle.remove()
    layer.base.bias.requires_grad_(True)  # e.g. combined with BitFit: its gradient must still flow
    x = torch.randn(4, D_IN, dtype=torch.float64)
    model(x).sum().backward()
    torch.testing.assert_close(layer.base.bias.grad, torch.full((D_OUT,), 4.0, dtype=torch.float64))
    model, layer = _layer(dropout=0.5)
    model.train()
    assert type(model(x.requires_grad_(True)).grad_fn).__name__ != "LinearLowRankBackward"
    model.eval()  # dropout inactive: the one-Function path again
    assert type(model(x).grad_fn).__name__ == "LinearLowRankBackward"


def test_mixed_dtypes_and_autocast_keep_the_two_step_path():
    model, layer = _layer(dtype=torch.float32)
    x = torch.randn(4, D_IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(model(x).grad_fn).__name__ != "LinearLowRankBackward"
    model[0].base.to(torch.bfloat16)
    assert type(model(x.bfloat16()).grad_fn).__name__ != "LinearLowRankBackward"


def test_no_grad_inference_equals_the_merged_model():
    model, layer = _layer()
    x = torch.randn(3, D_IN, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
        peftkit.merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-6, atol=1e-6)  # merge runs in float32
