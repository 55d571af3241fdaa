"""SSF, DiffFit, BitFit and LN tuning against hand-written references (methods.md 3.1, 3.2), plus the core
idea they needed: a module method that also selects base parameters to train."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.core import registry
from peftkit.core.apply import get_state
from peftkit.core.config import AdapterConfig
from peftkit.methods.difffit import DiffFitConfig
from peftkit.methods.selective import BitFitConfig, LNTuningConfig
from peftkit.methods.ssf import SSFConfig, SSFLayer

from tiny_models import example_inputs, mlp, output_of, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit


def _randomize(*params, seed=0, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(mean + std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _step(model, inputs, lr=0.1):
    """One SGD step on the trainable parameters; returns {name: value before}."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    output_of(model, inputs).float().pow(2).mean().backward()
    opt.step()
    return before


def _changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


# --- SSF ---------------------------------------------------------------------------------------------
def _ssf_on(module: nn.Module, **cfg) -> tuple[nn.Sequential, SSFLayer]:
    model = nn.Sequential(module)
    peftkit.apply(model, SSFConfig(targets=["0"], **cfg))
    layer = model[0]
    _randomize(layer.scale, mean=1.0, std=0.3, seed=1)
    if layer.shift is not None:
        _randomize(layer.shift, std=0.3, seed=2)
    return model, layer


@pytest.mark.parametrize("kind", ["linear", "layernorm", "conv2d"])
def test_ssf_forward_and_fold_match_the_paper(kind):
    """y = γ ⊙ base(x) + β, and the folded module (W' = diag(γ) W, b' = γ b + β) gives the same y (check 2)."""
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(6, 5).double(), torch.randn(3, 4, 6, dtype=torch.float64)
    elif kind == "layernorm":
        base, x = nn.LayerNorm(5).double(), torch.randn(3, 4, 5, dtype=torch.float64)
        _randomize(base.weight, base.bias, seed=5)
    else:
        base, x = nn.Conv2d(3, 5, 3, padding=1).double(), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model, layer = _ssf_on(base)
    gamma, beta = layer.scale.detach(), layer.shift.detach()
    if kind == "linear":
        ref = (x @ w0.T + b0) * gamma + beta
        w_ref = gamma[:, None] * w0
    elif kind == "layernorm":
        xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + base.eps)
        ref = (xhat * w0 + b0) * gamma + beta
        w_ref = gamma * w0
    else:
        ref = F.conv2d(x, w0, b0, padding=1) * gamma[:, None, None] + beta[:, None, None]
        w_ref = gamma[:, None, None, None] * w0
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-10, rtol=0)
        plain = peftkit.unload(peftkit.merge(model))  # AdapterLayer.merge folds in float32
        torch.testing.assert_close(plain[0].weight, w_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(plain[0].bias, gamma * b0 + beta, atol=1e-6, rtol=0)
        torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=0)


def test_ssf_embedding_scales_the_looked_up_columns():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    e0 = emb.weight.detach().clone()
    model, layer = _ssf_on(emb, bias_free_shift=False)
    assert layer.shift is None  # no bias to fold a shift into
    ids = torch.tensor([[1, 7, 3]])
    gamma = layer.scale.detach()
    torch.testing.assert_close(model(ids), e0[ids] * gamma)
    with torch.no_grad():
        peftkit.merge(model)
    torch.testing.assert_close(model[0].base.weight, e0 * gamma[None, :])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("scalar", [False, True])
def test_ssf_in_place_kernel_gradients_match_the_formula(shift, scalar, dtype):
    """dγ = Σ g ⊙ y, dβ = Σ g, dx = (g ⊙ γ) W, y recovered from the saved output; a bf16 base keeps fp32 γ."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5).to(dtype)
    layer = SSFLayer(base, "linear", shift=shift, init_std=0.0, module_name="0", scale_size=1 if scalar else None)
    _randomize(layer.scale, mean=1.0, std=0.3, seed=1)
    if shift:
        _randomize(layer.shift, std=0.3, seed=2)
    x = torch.randn(3, 4, 6, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 4, 5, dtype=dtype)
    out = layer(x)
    out.backward(g)
    tol = {"atol": 1e-10, "rtol": 0} if dtype == torch.float64 else {"atol": 0.05, "rtol": 0.02}
    with torch.no_grad():
        x64, g64, w64 = x.double(), g.double(), base.weight.double()
        y = x64 @ w64.T + base.bias.double()  # (3, 4, 5)
        gamma, beta = layer.scale.double().expand(5), layer.shift.double() if shift else 0.0
        torch.testing.assert_close(out.double(), gamma * y + beta, **tol)
        d_gamma = (g64 * y).sum((0, 1))
        torch.testing.assert_close(layer.scale.grad.double(), d_gamma.sum().view(1) if scalar else d_gamma, **tol)
        if shift:
            torch.testing.assert_close(layer.shift.grad.double(), g64.sum((0, 1)), **tol)
        torch.testing.assert_close(x.grad.double(), (g64 * gamma) @ w64, **tol)


def test_ssf_init_is_the_papers_and_std_zero_is_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4096))
    peftkit.apply(model, SSFConfig(targets=["0"]))
    gamma, beta = model[0].scale.detach(), model[0].shift.detach()
    assert abs(gamma.mean() - 1) < 2e-3 and abs(gamma.std() - 0.02) < 2e-3
    assert abs(beta.mean()) < 2e-3 and abs(beta.std() - 0.02) < 2e-3
    model = tiny_bert()
    inputs = example_inputs("bert")
    with torch.no_grad():
        base = output_of(model, inputs)
        peftkit.apply(model, SSFConfig(init_std=0.0))
        assert torch.equal(output_of(model, inputs), base)


def test_ssf_default_targets_and_count_on_llama():
    """Default: every linear but the head and every RMSNorm; bias-free, so γ only: Σ channels (check 3)."""
    model = tiny_llama()
    peftkit.apply(model, SSFConfig())
    wrapped = set(get_state(model).adapted)  # "all-norms" finds the RMSNorms, "all-linear" skips the head
    assert sorted(n for n in wrapped if "norm" in n) == [f"model.layers.{i}.{n}" for i in range(2) for n in (
        "input_layernorm", "post_attention_layernorm")] + ["model.norm"]
    assert "model.layers.0.self_attn.q_proj" in wrapped and "lm_head" not in wrapped
    # hidden 32, intermediate 64, 2 blocks: q,k,v,o 4x32 + gate,up 2x64 + down 32 + 2 norms x32, + final norm
    assert peftkit.trainable_parameters(model).trainable == 2 * (4 * 32 + 2 * 64 + 32 + 2 * 32) + 32
    assert all(model.get_submodule(n).shift is None for n in wrapped)


def test_ssf_count_is_twice_the_channels_where_there_are_biases():
    model = tiny_gpt2()
    peftkit.apply(model, SSFConfig(targets=["c_attn", "ln_1"]))
    assert peftkit.trainable_parameters(model).trainable == 2 * (2 * 96 + 2 * 32)


def test_ssf_shift_on_bias_free_module_refuses_to_merge_and_leaves_weights():
    model = tiny_llama()
    peftkit.apply(model, SSFConfig(targets=["q_proj", "post_attention_layernorm"], bias_free_shift=True))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(peftkit.MergeError, match="bias_free_shift=False"):
        peftkit.merge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class OffsetRMSNorm(nn.Module):
    """Gemma's norm: (1 + w) ⊙ x̂, not proportional to w."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_ssf_runs_on_an_offset_norm_but_refuses_to_fold_it():
    model = nn.Sequential(OffsetRMSNorm(4), nn.LayerNorm(4))
    peftkit.apply(model, SSFConfig(targets="all-norms"))
    x = torch.randn(2, 4)
    gamma = model[0].scale.detach()
    torch.testing.assert_close(model[0](x), model[0].base(x) * gamma)
    assert model[1].foldable
    with pytest.raises(peftkit.MergeError, match="not proportional to its weight"):
        peftkit.merge(model)


def test_ssf_bad_configs_raise_at_apply():
    with pytest.raises(peftkit.ConfigError, match="init_std"):
        SSFConfig(init_std=-0.1)
    with pytest.raises(peftkit.ConfigError, match="no module matched"):
        peftkit.apply(mlp(), SSFConfig(targets=["q_proj"]))
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(peftkit.ConfigError, match="supports none of the matched module types"):
        peftkit.apply(model, SSFConfig(targets=["1"]))  # BatchNorm normalises dim 1, not the last


def test_ssf_on_the_vit_is_the_papers_placement():
    model = tiny_vit()
    peftkit.apply(model, SSFConfig(targets=["all-linear", "all-norms", "patch_embed.proj"]))
    per_block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    assert get_state(model).adapted == ["patch_embed.proj", *[f"blocks.{i}.{n}" for i in range(2) for n in per_block],
                                        "norm"]


# --- DiffFit -----------------------------------------------------------------------------------------
def _biases_and_norms(model) -> set[str]:
    """By hand: every *.bias outside the head, every LayerNorm/RMSNorm parameter."""
    names = {n for n, _ in model.named_parameters() if n.endswith(".bias") and not n.startswith(("lm_head", "head"))}
    for mn, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
            names |= {f"{mn}.{n}" for n, _ in m.named_parameters()}
    return names


@pytest.mark.parametrize("per_channel", [False, True])
def test_difffit_trains_biases_norms_and_one_gamma_per_branch(per_channel):
    model = tiny_gpt2()
    expected = _biases_and_norms(model)
    peftkit.apply(model, DiffFitConfig(per_channel=per_channel))
    branches = [f"transformer.h.{i}.{b}.c_proj" for i in range(2) for b in ("attn", "mlp")]
    assert get_state(model).adapted == branches
    trainable = {n.replace(".base.", "."): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == expected | {f"{b}.scale" for b in branches}
    assert all(trainable[f"{b}.scale"].shape == ((32,) if per_channel else (1,)) for b in branches)


def test_difffit_is_identity_at_init_and_fold_matches_the_paper():
    """x + γ ⊙ (W h + b) with trained b; merged: W' = diag(γ) W, b' = γ b."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 5)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    base_out = model(x).detach()
    peftkit.apply(model, DiffFitConfig(targets=["1"], per_channel=True))
    torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)
    layer = model[1]
    _randomize(layer.scale, mean=1.0, std=0.3, seed=1)
    _randomize(layer.base.bias, model[0].weight, model[0].bias, seed=2)
    gamma, w, b = layer.scale.detach(), layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    ref = gamma * (model[0](x) @ w.T + b)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=0)
        plain = peftkit.unload(peftkit.merge(model))
    torch.testing.assert_close(plain[1].weight, gamma[:, None] * w, atol=1e-6, rtol=0)  # folded in float32
    torch.testing.assert_close(plain[1].bias, gamma * b, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=0)


def test_difffit_layers_pick_the_scaled_blocks_but_biases_train_everywhere():
    model = tiny_llama()
    peftkit.apply(model, DiffFitConfig(layers=[1]))
    assert get_state(model).adapted == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    assert "model.layers.0.input_layernorm.weight" in get_state(model).selected


def test_difffit_unmerged_unload_restores_and_file_holds_the_biases(tmp_path):
    model = tiny_bert()
    base = copy.deepcopy(model.state_dict())
    peftkit.apply(model, DiffFitConfig())
    _step(model, example_inputs("bert"))
    peftkit.save(model, tmp_path)
    saved = peftkit.core.io.adapter_state_dict(model)
    assert "bert.encoder.layer.0.attention.output.dense.bias" in saved
    assert "bert.encoder.layer.0.attention.output.dense.scale" in saved
    peftkit.unload(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, base[k], atol=0, rtol=0)


# --- the core idea: a module method that also selects base parameters -------------------------------
@dataclass
class _ScaleAndBiasesConfig(AdapterConfig):
    method = "test-scale-and-biases"


class _Scale(peftkit.AdapterLayer):
    def __init__(self, base):
        super().__init__(base)
        self.s = nn.Parameter(torch.ones(()))

    def adapt(self, x, y):
        return y * self.s

    def merged_weight(self, weight):
        return weight * self.s

    def merged_bias(self, bias):
        return None if bias is None else bias * self.s


@pytest.fixture
def both_kinds_method():
    registry.register(_ScaleAndBiasesConfig)(lambda module, cfg, name: _Scale(module))
    registry.register_selection(_ScaleAndBiasesConfig)(
        lambda model, cfg: [n for n, _ in model.named_parameters() if n.endswith("bias")])
    try:
        yield registry.get_method("test-scale-and-biases")
    finally:
        registry._METHODS.pop("test-scale-and-biases")


def test_core_method_with_builder_and_selector(both_kinds_method):
    """Both registrations are kept; apply wraps and selects; disabled/unload restore the originals of the
    selected parameters unless merged."""
    assert both_kinds_method.build is not None and both_kinds_method.select is not None
    model, inputs = mlp(), example_inputs("mlp")
    base, base_state = output_of(model, inputs).detach(), copy.deepcopy(model.state_dict())
    peftkit.apply(model, _ScaleAndBiasesConfig(targets=["fc2"]))
    assert get_state(model).selected == ["fc1.bias", "fc2.bias", "head.bias"]  # the model's own names
    with torch.no_grad():
        model.fc2.s.fill_(2.0)
        model.fc1.bias.add_(1.0)
        trained = output_of(model, inputs)
        with peftkit.disabled(model):
            torch.testing.assert_close(output_of(model, inputs), base, atol=0, rtol=0)
        torch.testing.assert_close(output_of(model, inputs), trained, atol=0, rtol=0)
    peftkit.unload(model)
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    peftkit.apply(model, _ScaleAndBiasesConfig(targets=["fc2"]))
    with torch.no_grad():
        model.fc1.bias.add_(1.0)
    plain = peftkit.unload(peftkit.merge(model))
    torch.testing.assert_close(plain.fc1.bias, base_state["fc1.bias"] + 1.0)


# --- BitFit and LN tuning ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind, make", [("bert", tiny_bert), ("gpt2", tiny_gpt2), ("mlp", mlp)])
def test_bitfit_only_biases_change_after_a_step(kind, make):
    model = make()
    expected = {n for n, _ in model.named_parameters() if n.endswith("bias") and not n.startswith(("head", "lm_head",
                                                                                                     "classifier"))}
    peftkit.apply(model, BitFitConfig())
    assert set(get_state(model).selected) == expected
    before = _step(model, example_inputs(kind))
    assert _changed(model, before) == expected


def test_ln_tuning_only_norm_parameters_change_after_a_step():
    model = tiny_llama()
    peftkit.apply(model, LNTuningConfig())
    before = _step(model, example_inputs("llama"))
    assert _changed(model, before) == {f"model.layers.{i}.{n}.weight" for i in range(2)
                                       for n in ("input_layernorm", "post_attention_layernorm")} | {"model.norm.weight"}


def test_bitfit_without_biases_says_what_to_use():
    with pytest.raises(peftkit.ConfigError, match="no bias parameters.*ln-tuning"):
        peftkit.apply(tiny_llama(), BitFitConfig())
    with pytest.raises(peftkit.ConfigError, match="no normalisation layer"):
        peftkit.apply(mlp(), LNTuningConfig())
    with pytest.raises(peftkit.ConfigError, match="takes no targets"):
        BitFitConfig(targets=["q_proj"])


def test_bitfit_on_a_llama_with_biases_and_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=100, attention_bias=True, mlp_bias=True))
    peftkit.apply(model, BitFitConfig(layers=[0]))
    # q, k, v, o (32 each) + gate, up (64 each) + down (32) in block 0
    assert peftkit.trainable_parameters(model).trainable == 4 * 32 + 2 * 64 + 32


@pytest.mark.parametrize("cfg", [BitFitConfig(), LNTuningConfig()])
def test_selection_disabled_unload_and_merge(cfg):
    model, inputs = tiny_gpt2(), example_inputs("gpt2")
    with torch.no_grad():
        base = output_of(model, inputs)
    base_state = copy.deepcopy(model.state_dict())
    peftkit.apply(model, cfg)
    _step(model, inputs, lr=1.0)
    model.eval()
    with torch.no_grad():
        trained = output_of(model, inputs)
        assert not torch.allclose(trained, base)
        with peftkit.disabled(model):
            torch.testing.assert_close(output_of(model, inputs), base, atol=0, rtol=0)
        plain = peftkit.unload(peftkit.merge(model))  # merged: the trained values stay
        torch.testing.assert_close(output_of(plain, inputs), trained, atol=0, rtol=0)
    assert any(not torch.equal(v, base_state[k]) for k, v in plain.state_dict().items())
    peftkit.apply(plain, cfg)
    _step(plain, inputs, lr=1.0)
    peftkit.unload(plain)  # unmerged: back to the values at apply time
    with torch.no_grad():
        torch.testing.assert_close(output_of(plain.eval(), inputs), trained, atol=0, rtol=0)
