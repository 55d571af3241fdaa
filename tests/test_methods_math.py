"""Each method's own math against a hand-written reference on small tensors (methods.md checks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.core.apply import adapter_layers_of

from tiny_models import example_inputs, mlp, tiny_gpt2, tiny_llama


def _randomize(*params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))


def _linear_model(d_in=16, d_out=12, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out, bias=bias))


# --- LoRA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_and_delta_match_the_formula(rslora):
    model = _linear_model()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.apply(model, peftkit.LoRAConfig(r=4, alpha=6, targets=["0"], rslora=rslora))
    layer = model[0]
    _randomize(layer.lora_A, layer.lora_B)
    s = 6 / (math.sqrt(4) if rslora else 4)
    assert layer.scaling == pytest.approx(s)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    torch.testing.assert_close(layer.delta_weight(), s * b @ a)
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), x @ w0.T + b0 + s * x @ a.T @ b.T, atol=1e-5, rtol=0)


def test_lora_init_gradients():
    """At init B = 0, so dL/dA = 0 exactly and dL/dB != 0 (methods.md F1, check 4)."""
    model = _linear_model()
    peftkit.apply(model, peftkit.LoRAConfig(r=4, targets=["0"]))
    model(torch.randn(5, 16)).pow(2).sum().backward()
    assert torch.count_nonzero(model[0].lora_A.grad) == 0
    assert torch.count_nonzero(model[0].lora_B.grad) > 0


def test_rank_and_alpha_patterns():
    model = mlp()
    cfg = peftkit.LoRAConfig(r=2, alpha=4, targets=["fc1", "fc2"], rank_pattern={"fc2": 6}, alpha_pattern={"fc2": 3})
    peftkit.apply(model, cfg)
    assert model.fc1.lora_A.shape == (2, 16) and model.fc1.scaling == 2.0
    assert model.fc2.lora_A.shape == (6, 32) and model.fc2.scaling == 0.5


def test_pissa_residual_plus_update_reproduces_w():
    model = _linear_model()
    w0 = model[0].weight.detach().clone()
    peftkit.apply(model, peftkit.LoRAConfig(r=4, alpha=8, targets=["0"], init="pissa"))
    layer = model[0]
    torch.testing.assert_close(layer.base.weight + layer.delta_weight(), w0, atol=1e-5, rtol=0)
    u, s, vh = torch.linalg.svd(w0)
    top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # s B A is the best rank-4 approximation of W0
    torch.testing.assert_close(layer.delta_weight(), top, atol=1e-5, rtol=0)
    peftkit.unload(model)
    torch.testing.assert_close(model[0].weight, w0, atol=1e-6, rtol=0)


def test_olora_factors_are_orthonormal_q_and_r():
    model = _linear_model()
    w0 = model[0].weight.detach().clone()
    peftkit.apply(model, peftkit.LoRAConfig(r=4, alpha=4, targets=["0"], init="olora"))
    b = model[0].lora_B.detach()
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(model[0].base.weight + model[0].delta_weight(), w0, atol=1e-5, rtol=0)


def test_lora_embedding_delta_is_transposed_product():
    emb = nn.Sequential(nn.Embedding(10, 6))
    w0 = emb[0].weight.detach().clone()
    peftkit.apply(emb, peftkit.LoRAConfig(r=3, alpha=3, targets=["0"]))
    layer = emb[0]
    _randomize(layer.lora_A, layer.lora_B)
    ids = torch.tensor([[1, 4, 9]])
    expected = F.embedding(ids, w0 + (layer.lora_B @ layer.lora_A).T.detach())
    torch.testing.assert_close(emb(ids), expected, atol=1e-5, rtol=0)


def test_lora_conv2d_equals_conv_with_updated_kernel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, stride=2))
    w0, b0 = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    peftkit.apply(net, peftkit.LoRAConfig(r=2, alpha=4, targets=["0"]))
    _randomize(net[0].lora_A, net[0].lora_B)
    x = torch.randn(2, 3, 8, 8)
    expected = F.conv2d(x, w0 + net[0].delta_weight().detach(), b0, stride=2, padding=1)
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)


def test_lora_on_gpt2_conv1d_uses_in_out_layout():
    model = tiny_gpt2()
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A.shape == (2, 32) and layer.lora_B.shape == (96, 2)


# --- DoRA --------------------------------------------------------------------------------------
def test_dora_forward_and_merged_weight_match_the_paper():
    model = _linear_model()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.apply(model, peftkit.DoRAConfig(r=4, alpha=8, targets=["0"]))
    layer = model[0]
    torch.testing.assert_close(layer.magnitude.detach(), w0.norm(dim=1))  # m = ||W0|| at init
    _randomize(layer.lora_A, layer.lora_B, layer.magnitude)
    v = w0 + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    norm = v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer.row_norm(), norm.squeeze(1), atol=1e-4, rtol=1e-5)
    w_merged = layer.magnitude.detach()[:, None] * v / norm
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), x @ w_merged.T + b0, atol=1e-4, rtol=1e-5)
    peftkit.merge(model)
    torch.testing.assert_close(model[0].base.weight, w_merged, atol=1e-5, rtol=1e-5)


def test_dora_norm_is_detached():
    model = _linear_model()
    peftkit.apply(model, peftkit.DoRAConfig(r=2, targets=["0"]))
    assert not model[0].row_norm().requires_grad


# --- (IA)^3 ------------------------------------------------------------------------------------
def test_ia3_output_and_input_scaling():
    model = mlp()
    w1, b1 = model.fc1.weight.detach().clone(), model.fc1.bias.detach().clone()
    w2, b2 = model.fc2.weight.detach().clone(), model.fc2.bias.detach().clone()
    peftkit.apply(model, peftkit.IA3Config(targets=["fc1", "fc2"], feedforward=["fc2"]))
    _randomize(model.fc1.ia3_l, model.fc2.ia3_l)
    l1, l2 = model.fc1.ia3_l.detach().flatten(), model.fc2.ia3_l.detach().flatten()
    x = torch.randn(3, 16)
    h = torch.relu(l1 * (x @ w1.T + b1))
    expected = (l2 * h) @ w2.T + b2
    torch.testing.assert_close(model.fc2(h), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.relu(model.fc1(x)), h, atol=1e-5, rtol=0)
    peftkit.merge(model)
    torch.testing.assert_close(model.fc1.base.weight, l1[:, None] * w1, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.fc1.base.bias, l1 * b1, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.fc2.base.weight, w2 * l2[None, :], atol=1e-6, rtol=0)


# --- prompt tuning -----------------------------------------------------------------------------
def test_prompt_of_length_zero_is_the_base_model():
    model, inputs = tiny_llama(), example_inputs("llama")
    with torch.no_grad():
        base = model(**inputs).logits
    peftkit.apply(model, peftkit.PromptTuningConfig(num_virtual_tokens=0))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base)


def test_prompt_pads_mask_and_labels_and_gets_gradient():
    model, inputs = tiny_llama(), example_inputs("llama")
    peftkit.apply(model, peftkit.PromptTuningConfig(num_virtual_tokens=4))
    seen = {}
    hook = model.model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    out = model(**inputs, labels=inputs["input_ids"])
    hook.remove()
    assert out.logits.shape[1] == 4 + 6 and seen["attention_mask"].shape[1] == 10
    out.loss.backward()
    prompt = model.model.embed_tokens.prompt
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    # the prompt equals prepending its vectors by hand
    embeds = torch.cat([prompt.detach().expand(2, -1, -1), model.model.embed_tokens.base(inputs["input_ids"])], 1)
    peftkit_state = model.peftkit_state
    with torch.no_grad(), peftkit.disabled(model):
        mask = torch.ones(2, 10, dtype=torch.long)
        manual = model(inputs_embeds=embeds, attention_mask=mask).logits
    assert peftkit_state is model.peftkit_state
    torch.testing.assert_close(out.logits.detach(), manual, atol=1e-5, rtol=0)


def test_prompt_tuning_generate_matches_a_manual_greedy_loop():
    model = tiny_llama()
    peftkit.apply(model, peftkit.PromptTuningConfig(num_virtual_tokens=3))
    _randomize(model.model.embed_tokens.prompt)
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0)
        manual = ids
        for _ in range(5):  # no cache: the prompt is prepended to the whole sequence each time
            logits = model(input_ids=manual, attention_mask=torch.ones_like(manual), use_cache=False).logits
            manual = torch.cat([manual, logits[:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == manual.tolist()


def test_adapter_layers_listed_in_apply_order():
    model = mlp()
    peftkit.apply(model, peftkit.LoRAConfig(targets=["fc1", "fc2"]))
    assert [type(m).__name__ for m in adapter_layers_of(model)] == ["LoRALinear", "LoRALinear"]
