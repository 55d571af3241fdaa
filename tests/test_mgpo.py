"""LoRA-MGPO (issue 16, methods.md §7.5): ρ = 0 is plain LoRA bit for bit, ε never lands in a parameter,
one forward and one backward per step, ε equals the paper's equation, resume equals an uninterrupted run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import peftkit
from peftkit.core.config import ConfigError
from peftkit.schedules import MGPO
from peftkit.train import loop
from peftkit.train.loop import TrainConfig, train

from tiny_models import MLP, tiny_gpt2
from train_toy import stack, toy_config


def lora_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = peftkit.apply(MLP(), peftkit.LoRAConfig(r=2, alpha=4, targets=["fc1", "fc2"]))
    with torch.no_grad():  # B != 0, so the factors' momentum moves W in both directions from step 1 on
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.train()


def batches(n: int, seed: int = 1, scale: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), scale * torch.randn(8, 4, generator=g)) for _ in range(n)]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_steps(model, data, rho: float | None, beta: float = 0.9, lr: float = 1e-2):
    """AdamW steps in the order of peftkit's loop; rho=None: no MGPO at all (plain LoRA)."""
    optimizer = torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.01)
    mgpo = None if rho is None else MGPO(model, optimizer, rho=rho, beta=beta)
    for step, (x, y) in enumerate(data, start=1):
        F.mse_loss(model(x), y).backward()
        if mgpo is not None:
            mgpo.step(step, optimizer)
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, mgpo


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_rho_zero_is_plain_lora_bit_for_bit():
    plain, zero, perturbed = lora_mlp(), lora_mlp(), lora_mlp()
    data = batches(5)
    train_steps(plain, data, rho=None)
    train_steps(zero, data, rho=0.0)
    train_steps(perturbed, data, rho=0.05)
    for key, value in state(plain).items():
        assert torch.equal(state(zero)[key], value), key
    assert any(not torch.equal(state(perturbed)[k], v) for k, v in state(plain).items())  # ε did act


def test_the_parameters_never_hold_the_perturbation():
    """Each step's update is AdamW's on the perturbed forward's gradients, from the unperturbed parameters;
    the frozen base weights keep their bits."""
    model = lora_mlp()
    base = {k: v.clone() for k, v in state(model).items() if "lora" not in k}
    params = trainable(model)
    lr, wd, (b1, b2), adam_eps = 1e-2, 0.01, (0.9, 0.999), 1e-8
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    mgpo = MGPO(model, optimizer, rho=0.5)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step, (x, y) in enumerate(batches(4), start=1):
        before = [p.detach().clone() for p in params]
        F.mse_loss(model(x), y).backward()
        mgpo.step(step, optimizer)
        grads = [p.grad.clone() for p in params]
        optimizer.step()
        optimizer.zero_grad()
        for i, (p, p0, g) in enumerate(zip(params, before, grads, strict=True)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            expected = p0 * (1 - lr * wd) - lr * (m[i] / (1 - b1**step)) / ((v[i] / (1 - b2**step)).sqrt() + adam_eps)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        assert mgpo._eps == {}  # made lazily at the next forward
        x, _ = batches(1, seed=9)[0]
        with torch.no_grad():  # outside training (no_grad / eval) the model is the unperturbed one
            ref = model.eval()(x)
            assert torch.equal(model.train()(x), ref)
    for key, value in base.items():
        assert torch.equal(state(model)[key], value), key


def test_one_forward_and_one_backward_per_step():
    model = lora_mlp()
    layers = [model.fc1, model.fc2]
    counts = {"forward": 0, "backward": 0, "layer_forward": 0}

    def count(module, args, out):
        counts["forward"] += 1
        out.register_hook(lambda grad: counts.__setitem__("backward", counts["backward"] + 1))

    model.register_forward_hook(count)
    for layer in layers:
        layer.register_forward_hook(lambda *a: counts.__setitem__("layer_forward", counts["layer_forward"] + 1))
    optimizer, mgpo = train_steps(model, batches(4), rho=0.05)
    assert counts == {"forward": 4, "backward": 4, "layer_forward": 8}
    assert len(mgpo.gbar) == 2


def hand_epsilon(layer, optimizer, gbar: float | None, rho: float) -> torch.Tensor:
    """ε = -ρ v / (‖v‖ + δ) · min(1 / (ḡ + δ), 10), v = s (m_B A + B m_A), materialized (d_out, d_in)."""
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    m_a, m_b = optimizer.state[layer.lora_A]["exp_avg"], optimizer.state[layer.lora_B]["exp_avg"]
    direction = s * (m_b @ a + b @ m_a)
    factor = 1.0 if gbar is None else min(1.0 / (gbar + 1e-12), 10.0)
    return -rho * direction / (torch.linalg.vector_norm(direction) + 1e-12) * factor


def weight_grad_norm(layer) -> float:
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    return float(torch.linalg.vector_norm(layer.scaling * (layer.lora_B.grad @ a + b @ layer.lora_A.grad)))


@pytest.mark.parametrize("loss_scale, clamped", [(300.0, False), (1e-4, True)])
def test_epsilon_is_the_equation(loss_scale, clamped):
    """Step 1 is unperturbed (no momentum); from step 2 the layer's output moves by ε x exactly, with ḡ an
    EMA of the weight-space gradient norms; tiny gradients hit the clamp 10 of 1 / ḡ."""
    model, rho, beta = lora_mlp(), 0.3, 0.8
    layer = model.fc1
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    mgpo = MGPO(model, optimizer, rho=rho, beta=beta)
    gbar = None
    for step, (x, y) in enumerate(batches(3, scale=loss_scale), start=1):
        h = torch.randn(5, 16)
        with torch.no_grad():
            shift = layer(h) - layer.eval()(h)  # ε h: train-mode output minus the plain one
            layer.train()
        model.zero_grad()
        with torch.enable_grad():
            probe = layer(h).sum()  # a training forward makes ε (lazily) ...
        expected = torch.zeros(32, 16) if step == 1 else hand_epsilon(layer, optimizer, gbar, rho)
        torch.testing.assert_close(probe.detach(), (layer.eval()(h) + h @ expected.T).sum(), rtol=1e-5, atol=1e-5)
        layer.train()
        assert torch.count_nonzero(shift) == 0  # ... and nothing perturbs a no_grad forward
        model.zero_grad()
        (loss_scale * F.mse_loss(model(x), y)).backward()
        g = weight_grad_norm(layer)
        gbar = g if gbar is None else beta * gbar + (1 - beta) * g
        mgpo.step(step, optimizer)
        assert math.isclose(float(mgpo.gbar["fc1"]), gbar, rel_tol=1e-5)
        optimizer.step()
    assert (1.0 / gbar > 10.0) == clamped


def test_gpt2_conv1d_layers_see_the_same_equation():
    model = peftkit.apply(tiny_gpt2(), peftkit.LoRAConfig(r=2, alpha=4, targets=["c_attn", "c_fc"])).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    mgpo = MGPO(model, optimizer, rho=0.1)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    for step in (1, 2):
        model(input_ids=ids, labels=ids).loss.backward()
        mgpo.step(step, optimizer)
        optimizer.step()
        optimizer.zero_grad()
    name = "transformer.h.0.attn.c_attn"
    layer = model.get_submodule(name)
    h = torch.randn(3, 32)
    plain = layer.eval()(h).detach()
    out = layer.train()(h).detach()
    expected = hand_epsilon(layer, optimizer, float(mgpo.gbar[name]), 0.1)  # (d_out, d_in) = (96, 32)
    torch.testing.assert_close(out - plain, h @ expected.T, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(expected) > 0


# --- the training loop: schedule mgpo, resumed == uninterrupted -------------------------------------------
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32, tie_word_embeddings=False)
    return peftkit.apply(LlamaForCausalLM(cfg), peftkit.LoRAConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]))


def lm_data(n: int, seed: int = 0) -> list[dict]:
    ids = torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def run(out, resume=False, **fields):
    model = llama()
    cfg = toy_config(out, **{"max_steps": 8, "save_every": 4, "eval_every": 0, "batch_size": 4, "grad_accum": 2,
                             "schedule": "mgpo", "mgpo_rho": 0.05, "mgpo_beta": 0.8, **fields})
    train(model, lm_data(64), lm_data(8, seed=1), cfg, stack, resume=resume)
    return state(model)


def test_a_resumed_mgpo_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "plot_loss", lambda metrics, path: None)
    whole = run(tmp_path / "whole")
    saved = load_file(tmp_path / "whole" / "checkpoint-000004" / "training_schedule.safetensors")
    assert sorted(saved) == [f"gbar.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    half = run(tmp_path / "half", resume=tmp_path / "whole" / "checkpoint-000004")
    for key, value in whole.items():
        assert torch.equal(half[key], value), key
    plain = run(tmp_path / "plain", mgpo_rho=0.0)
    assert any(not torch.equal(plain[k], v) for k, v in whole.items())


# --- what is refused ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"rho": -0.1}, "rho=-0.1 must be a finite number >= 0"),
    ({"rho": float("nan")}, "rho=nan"),
    ({"rho": True}, "rho=True"),
    ({"beta": 1.0}, r"beta=1.0 must be in \[0, 1\)"),
    ({"beta": -0.5}, "beta=-0.5"),
])
def test_bad_settings_are_refused(kwargs, match):
    model = lora_mlp()
    with pytest.raises(ConfigError, match=match):
        MGPO(model, torch.optim.AdamW(trainable(model)), **kwargs)


def test_what_mgpo_does_not_support_is_refused():
    with pytest.raises(ConfigError, match="needs trainable LoRA layers.*adapter layers in this model: none"):
        MGPO(MLP(), torch.optim.AdamW(MLP().parameters()))
    dora = peftkit.apply(MLP(), peftkit.DoRAConfig(r=2, targets=["fc1"]))
    with pytest.raises(ConfigError, match="this model also trains DoRALinear, which it does not support"):
        MGPO(dora, torch.optim.AdamW(trainable(dora)))
    model = lora_mlp()
    with pytest.raises(ConfigError, match="MGPO may activate 2 parameters the optimizer does not hold"):
        MGPO(model, torch.optim.AdamW([model.fc1.lora_A, model.fc1.lora_B]))
    with pytest.raises(ConfigError, match="needs the optimizer"):
        MGPO(model, None)


def test_an_optimizer_without_momentum_is_refused():
    model = lora_mlp()
    optimizer = torch.optim.Adagrad(trainable(model))
    with pytest.raises(ConfigError, match="first moment of each LoRA factor.*Use AdamW"):
        train_steps_with(model, optimizer, steps=2)


def train_steps_with(model, optimizer, steps: int) -> None:
    mgpo = MGPO(model, optimizer, rho=0.05)
    for step, (x, y) in enumerate(batches(steps), start=1):
        F.mse_loss(model(x), y).backward()
        mgpo.step(step, optimizer)
        optimizer.step()
        optimizer.zero_grad()


def test_state_of_other_layers_and_bad_train_fields_are_refused(tmp_path):
    model = lora_mlp()
    mgpo = MGPO(model, torch.optim.AdamW(trainable(model)))
    with pytest.raises(ConfigError, match="names layers this model does not train with LoRA"):
        mgpo.load_state_dict({"gbar.fc3": torch.tensor(1.0)})
    with pytest.raises(ConfigError, match=r"mgpo_rho must be finite and >= 0 and mgpo_beta in \[0, 1\)"):
        TrainConfig(output_dir=str(tmp_path), schedule="mgpo", mgpo_rho=-1.0)
    with pytest.raises(ConfigError, match="optimizer=mezo perturbs every parameter"):
        TrainConfig(output_dir=str(tmp_path), schedule="mgpo", optimizer="mezo")
    with pytest.raises(ConfigError, match="schedule must be null, 'lisa', 'ist' or 'mgpo'"):
        TrainConfig(output_dir=str(tmp_path), schedule="ggpo")


def test_no_perturbation_with_the_adapter_off_and_a_bf16_base_trains():
    model = lora_mlp()
    optimizer, mgpo = train_steps(model, batches(2), rho=0.5)
    x = batches(1, seed=9)[0][0]
    with peftkit.disabled(model):
        assert torch.equal(model(x), model.eval()(x))  # the base model, exactly
    model.train()
    assert not torch.equal(model(x), model.eval()(x))  # while training with the adapter on: ε acts
    mgpo.remove()
    assert torch.equal(model.train()(x), model.eval()(x))
    half = lora_mlp()
    for name, p in half.named_parameters():
        if "lora" not in name:
            p.data = p.data.to(torch.bfloat16)
    _, mgpo = train_steps(half, [(x.to(torch.bfloat16), y.to(torch.bfloat16)) for x, y in batches(3)], rho=0.05)
    assert all(math.isfinite(float(g)) for g in mgpo.gbar.values()) and all(
        torch.isfinite(p).all() for p in trainable(half))
