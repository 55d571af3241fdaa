"""SpIEL (methods.md 5.1) and LoFiT (3.3) against hand-written references on small tensors, plus the core's
bias creation for merges that shift the output (weights.set_bias / remove_bias)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core import weights
from peftkit.core.layer import AdapterLayer, MergeError, adapter_layers
from peftkit.core.registry import config_from_dict
from peftkit.core.schedule import schedule_for
from peftkit.methods.lofit import LoFiTConfig, LoFiTL1, lofit_two_stage, select_heads
from peftkit.methods.spiel import SpIELConfig, random_subset
from peftkit.methods.spiel_reselection import plan_regrowth, seed_moments

from tiny_models import example_inputs, output_of, tiny_gpt2, tiny_llama


def _dense(index, values, d_out, d_in):
    """ΔW written entry by entry."""
    out = torch.zeros(d_out, d_in, dtype=values.dtype)
    for i, v in zip(index.tolist(), values.tolist(), strict=True):
        out[i // d_in, i % d_in] += v
    return out


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))


# --- SpIEL: parameterisation, forward, gradients ----------------------------------------------------
def test_spiel_init_is_identity_with_k_sorted_distinct_indices():
    model = tiny_llama()
    inputs = example_inputs("llama")
    with torch.no_grad():
        base = output_of(model, inputs)
    peftkit.apply(model, SpIELConfig(density=0.05))
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)
    for layer in adapter_layers(model).values():
        index, numel = layer.sparse_index, layer.d_out * layer.d_in
        assert index.dtype == torch.int64 and index.numel() == round(0.05 * numel) == layer.sparse_values.numel()
        assert torch.equal(index, index.sort().values) and index.unique().numel() == index.numel()
        assert 0 <= int(index.min()) and int(index.max()) < numel and not layer.sparse_values.any()


@pytest.mark.parametrize("observe", [False, True], ids=["sampled", "dense-window"])
def test_spiel_forward_and_gradients_match_a_dense_delta(observe):
    """y = x (W0 + ΔW)^T + b; dL/dvalues = (dL/dΔW)[η], dL/dx as for the dense layer, in both backward paths."""
    model = _mlp().double()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.apply(model, SpIELConfig(density=0.3, targets=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.sparse_values.copy_(torch.randn(layer.k, dtype=torch.float64))
    seen = []
    layer.gradient_observer = seen.append if observe else None
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, 10, dtype=torch.float64)
    (layer(x) - target).pow(2).sum().backward()
    delta = _dense(layer.sparse_index, layer.sparse_values.detach(), 10, 12).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out_ref = x_ref @ (w0 + delta).T + b0
    (out_ref - target).pow(2).sum().backward()
    torch.testing.assert_close(layer(x), out_ref)
    torch.testing.assert_close(layer.sparse_values.grad, delta.grad.flatten()[layer.sparse_index])
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert len(seen) == int(observe)
    if observe:
        torch.testing.assert_close(seen[0], delta.grad)


def test_spiel_on_gpt2_conv1d_uses_the_canonical_layout():
    model = tiny_gpt2().double()
    conv = model.transformer.h[0].attn.c_attn
    w0, b0 = conv.weight.detach().T.clone(), conv.bias.detach().clone()  # Conv1D stores (d_in, d_out)
    peftkit.apply(model, SpIELConfig(density=0.1, targets=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.sparse_values.copy_(torch.randn(layer.k, dtype=torch.float64))
    x = torch.randn(2, 4, 32, dtype=torch.float64)
    expected = x @ (w0 + _dense(layer.sparse_index, layer.sparse_values.detach(), 96, 32)).T + b0
    torch.testing.assert_close(layer(x), expected)


def test_spiel_bf16_autocast_is_close_to_fp32():
    model = _mlp()
    peftkit.apply(model, SpIELConfig(density=0.5, targets=["0"]))
    with torch.no_grad():
        model[0].sparse_values.normal_(0, 0.1)
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model[0](x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), model[0](x), atol=3e-2, rtol=3e-2)


def test_spiel_merge_and_unmerge_are_exact():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # small entries: (w + v) - v != w in float32 for v ~ 1
    w0 = model[0].weight.detach().clone()
    peftkit.apply(model, SpIELConfig(density=0.4, targets=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.sparse_values.copy_(torch.randn(layer.k))
    peftkit.merge(model)
    merged = layer.base.weight.detach().flatten()
    outside = torch.ones(120, dtype=torch.bool)
    outside[layer.sparse_index] = False
    assert torch.equal(merged[outside], w0.flatten()[outside])  # ΔW is zero off η
    assert torch.equal(merged[layer.sparse_index], w0.flatten()[layer.sparse_index] + layer.sparse_values.detach())
    assert not torch.equal((merged[layer.sparse_index] - layer.sparse_values.detach()),
                           w0.flatten()[layer.sparse_index])  # why unmerge restores saved entries
    peftkit.unmerge(model)
    assert torch.equal(layer.base.weight, w0)


def test_random_subset_is_distinct_and_covers_uniformly():
    torch.manual_seed(0)
    counts = torch.zeros(40)
    for _ in range(400):
        idx = random_subset(40, 6)
        assert idx.numel() == 6 and idx.unique().numel() == 6 and torch.equal(idx, idx.sort().values)
        counts[idx] += 1
    assert counts.min() > 30 and counts.max() < 90  # expected 60 per position
    assert random_subset(10, 10).tolist() == list(range(10))


# --- SpIEL: re-selection -------------------------------------------------------------------------
def test_plan_regrowth_hand_example_with_a_collision():
    index = torch.tensor([0, 3, 5, 7, 9])
    values = torch.tensor([0.5, -0.01, 0.2, 0.0, -0.3])
    candidates = torch.tensor([3, 4, 9, 11, 2])
    scores = torch.tensor([5.0, 1.0, 9.0, 3.0, 2.0])
    # drop the 2 smallest |v|: slots 3 (entry 7), 1 (entry 3); kept {0, 5, 9}; free candidates 3, 4, 11, 2;
    # grow the top 2 by score: 3 (5.0), 11 (3.0); entry 3 is both dropped and grown: it stays
    slots, grow = plan_regrowth(index, values, candidates, scores, 2)
    assert slots.tolist() == [3] and candidates[grow].tolist() == [11]
    slots, grow = plan_regrowth(index, values, candidates, scores, 0)
    assert slots.numel() == grow.numel() == 0


def test_replacement_rate_and_windows():
    model = _mlp()
    peftkit.apply(model, SpIELConfig(density=0.2, reselection_steps=5, selection_accumulation_steps=2,
                                      initial_reselection_rate=0.3, reselection_decay="cosine"))
    schedule = schedule_for(model, total_steps=20)
    assert [s for s in range(1, 21) if schedule.in_window(s)] == [1, 2, 6, 7, 11, 12, 16, 17]
    assert [s for s in range(1, 25) if schedule.ends_window(s)] == [2, 7, 12, 17]
    assert schedule.rate(2) == 1.0
    assert schedule.rate(7) == pytest.approx(0.3 * (1 + math.cos(math.pi * 7 / 20)) / 2)
    schedule.cfg = schedule.cfg.replace(reselection_decay="linear")
    assert schedule.rate(12) == pytest.approx(0.3 * (1 - 12 / 20))
    with pytest.raises(peftkit.ConfigError, match="total_steps"):
        schedule_for(model)


def test_seed_moments_makes_adams_next_step_start_from_the_window_means():
    p = nn.Parameter(torch.zeros(5))
    opt = torch.optim.AdamW([p], lr=0.0, betas=(0.8, 0.95), weight_decay=0.0)
    for _ in range(3):
        p.grad = torch.randn(5)
        opt.step()
    slots, mean = torch.tensor([1, 3]), torch.tensor([0.5, -2.0])
    seed_moments(opt.state[p], (0.8, 0.95), slots, mean, mean**2, 5)
    p.grad = torch.zeros(5)
    p.grad[slots] = mean
    opt.step()  # step t = 4: bias-corrected moments of a constant gradient equal it
    state = opt.state[p]
    torch.testing.assert_close(state["exp_avg"][slots] / (1 - 0.8**4), mean)
    torch.testing.assert_close(state["exp_avg_sq"][slots] / (1 - 0.95**4), mean**2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(density=True), "density"),
    (dict(reselection_steps=0), "reselection_steps"),
    (dict(reselection_steps=4, selection_accumulation_steps=5), "must not exceed"),
    (dict(initial_reselection_rate=1.2), "initial_reselection_rate"), (dict(reselection_decay="step"), "decay"),
])
def test_spiel_bad_configs_raise(kwargs, match):
    with pytest.raises(peftkit.ConfigError, match=match):
        SpIELConfig(**kwargs)


def test_spiel_density_too_small_for_a_layer_raises_at_apply():
    model = _mlp()
    with pytest.raises(peftkit.ConfigError, match="no trainable entry"):
        peftkit.apply(model, SpIELConfig(density=1e-4, targets=["0"]))
    assert isinstance(model[0], nn.Linear) and not hasattr(model, "peftkit_state")


# --- LoFiT ---------------------------------------------------------------------------------------
def _o_proj(model, i):
    return model.model.layers[i].self_attn.o_proj


def test_lofit_forward_is_the_per_head_formula():
    """o_proj((1 + A) ⊙ z) in stage 1 and o_proj(z + v on the selected heads) in stage 2 (2 heads of 16)."""
    model = tiny_llama().double()
    w0 = _o_proj(model, 1).weight.detach().clone()
    z = torch.randn(2, 3, 32, dtype=torch.float64)
    peftkit.apply(model, LoFiTConfig())
    layer = _o_proj(model, 1)
    scale = layer.lofit_scale.detach()
    torch.testing.assert_close(layer(z), (z * (1 + scale)) @ w0.T)
    peftkit.apply(model, LoFiTConfig(heads=[[1, 1], [0, 0]]), replace=True)
    layer = _o_proj(model, 1)
    with torch.no_grad():
        layer.lofit_offset.copy_(torch.randn(1, 16, dtype=torch.float64))
    shifted = z.clone()
    shifted[..., 16:32] += layer.lofit_offset.detach()[0]  # head 1 of layer 1 only
    torch.testing.assert_close(layer(z), shifted @ w0.T)


def test_lofit_identity_with_zero_scalings_and_offsets():
    model = tiny_llama()
    inputs = example_inputs("llama")
    with torch.no_grad():
        base = output_of(model, inputs)
    for cfg in (LoFiTConfig(init_std=0.0), LoFiTConfig(heads=[[0, 1], [1, 0]])):
        peftkit.apply(model, cfg, replace=True)
        with torch.no_grad():
            assert torch.equal(output_of(model, inputs), base)


def test_lofit_only_selected_heads_offsets_get_gradients():
    model = tiny_llama().double()
    w0 = _o_proj(model, 0).weight.detach().clone()
    peftkit.apply(model, LoFiTConfig(heads=[[0, 1]]))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["model.layers.0.self_attn.o_proj.lofit_offset"]
    assert trainable["model.layers.0.self_attn.o_proj.lofit_offset"].shape == (1, 16)
    layer = _o_proj(model, 0)
    z = torch.randn(2, 5, 32, dtype=torch.float64)
    out_grad = torch.randn(2, 5, 32, dtype=torch.float64)
    (layer(z) * out_grad).sum().backward()
    expected = (out_grad.reshape(-1, 32) @ w0).sum(0)[16:]  # dL/dv_h = Σ_t (W^T g_t) on head 1's features
    torch.testing.assert_close(layer.lofit_offset.grad[0], expected)
    assert type(_o_proj(model, 1)) is nn.Linear  # layer 1 has no selected head: not wrapped


def test_lofit_stage2_merge_folds_W_v_into_a_new_bias_and_unmerge_removes_it():
    model = tiny_llama()
    inputs = example_inputs("llama")
    w0 = _o_proj(model, 0).weight.detach().clone()
    peftkit.apply(model, LoFiTConfig(heads=[[0, 0], [1, 1]]))
    with torch.no_grad():
        _o_proj(model, 0).lofit_offset.normal_()
        _o_proj(model, 1).lofit_offset.normal_()
        expected = output_of(model, inputs)
    v = torch.zeros(32)
    v[:16] = _o_proj(model, 0).lofit_offset.detach()[0]
    peftkit.merge(model)
    base = _o_proj(model, 0).base
    torch.testing.assert_close(base.bias.detach(), w0 @ v)
    assert not base.bias.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-5, rtol=0)
    peftkit.unmerge(model)
    assert base.bias is None and "bias" not in dict(base.named_parameters())
    plain = peftkit.unload(model)
    assert type(_o_proj(plain, 0)) is nn.Linear and _o_proj(plain, 0).bias is None


def test_lofit_stage1_l1_term_and_schedule():
    model = tiny_llama()
    peftkit.apply(model, LoFiTConfig(l1=2e-3))
    schedule = schedule_for(model, total_steps=5)
    assert isinstance(schedule, LoFiTL1)
    scales = [_o_proj(model, i).lofit_scale for i in range(2)]
    expected = 2e-3 * sum(float(a.detach().abs().sum()) for a in scales)
    assert float(schedule.extra_loss(model).detach()) == pytest.approx(expected, rel=1e-6)
    schedule.extra_loss(model).backward()
    torch.testing.assert_close(scales[0].grad, 2e-3 * scales[0].detach().sign())
    peftkit.apply(model, LoFiTConfig(heads=[[0, 0]]), replace=True)
    assert schedule_for(model, total_steps=5) is None
    peftkit.apply(model, LoFiTConfig(l1=0.0), replace=True)
    assert schedule_for(model, total_steps=5) is None


def test_select_heads_ranks_by_norm_with_ties_by_layer_then_head():
    model = tiny_llama()
    peftkit.apply(model, LoFiTConfig())
    norms = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 3.0, (1, 1): 0.5}  # (0,1) and (1,0) tie
    with torch.no_grad():
        for (layer, head), norm in norms.items():
            a = _o_proj(model, layer).lofit_scale.view(2, 16)
            a[head] = norm / 4.0  # ‖(c, ..., c)‖₂ over 16 entries = 4 c
    assert select_heads(model, 3) == [(0, 1), (1, 0), (0, 0)]
    assert select_heads(model, 4) == select_heads(model, 4)
    with pytest.raises(peftkit.ConfigError, match="k must be"):
        select_heads(model, 5)
    peftkit.apply(model, LoFiTConfig(heads=[[0, 0]]), replace=True)
    with pytest.raises(peftkit.ConfigError, match="stage-1"):
        select_heads(model, 1)


def test_lofit_two_stage_trains_both_stages_on_the_selected_heads():
    model = tiny_llama()
    calls = []

    def train(m):
        calls.append(sorted(n for n, p in m.named_parameters() if p.requires_grad))
        if len(calls) == 1:  # "training" stage 1: make head 1 of layer 1 the strongest
            with torch.no_grad():
                _o_proj(m, 1).lofit_scale[16:] += 1.0

    heads = lofit_two_stage(model, train, k=1)
    assert heads == [(1, 1)] and len(calls) == 2
    assert calls[0] == [f"model.layers.{i}.self_attn.o_proj.lofit_scale" for i in range(2)]
    assert calls[1] == ["model.layers.1.self_attn.o_proj.lofit_offset"]
    assert peftkit.trainable_parameters(model).trainable == 16 and _o_proj(model, 1).head_ids == [1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(heads=[]), "non-empty"), (dict(heads=[[0]]), "pairs"), (dict(heads=[[0, -1]]), "pairs"),
    (dict(heads=[[0, 1], (0, 1)]), "twice"), (dict(num_heads=0), "num_heads"), (dict(l1=-1.0), "l1"),
])
def test_lofit_bad_configs_raise(kwargs, match):
    with pytest.raises(peftkit.ConfigError, match=match):
        LoFiTConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(heads=[[0, 2]]), "head 2 of layer 0"),
    (dict(heads=[[0, 0], [5, 0]]), "layer 5"),
    (dict(num_heads=3), "not a multiple of 3"),
    (dict(targets=["o_proj", "q_proj"]), "several in one block"),
])
def test_lofit_configs_that_do_not_fit_the_model_raise_at_apply(kwargs, match):
    model = tiny_llama()
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.apply(model, LoFiTConfig(**kwargs))
    assert isinstance(_o_proj(model, 0), nn.Linear) and not hasattr(model, "peftkit_state")


def test_lofit_config_round_trips_heads_through_json():
    cfg = LoFiTConfig(heads=[(1, 0), (0, 1)])
    assert cfg.heads == [[1, 0], [0, 1]]
    assert config_from_dict(cfg.to_dict()) == cfg


# --- core: a merge may create a bias ------------------------------------------------------------
def test_set_bias_creates_and_remove_bias_removes_a_bias():
    linear = nn.Linear(3, 2, bias=False)
    weights.set_bias(linear, torch.tensor([1.0, -2.0]))
    assert isinstance(linear.bias, nn.Parameter) and linear.bias.tolist() == [1.0, -2.0]
    torch.testing.assert_close(linear(torch.zeros(1, 3)), torch.tensor([[1.0, -2.0]]))
    weights.remove_bias(linear)
    assert linear.bias is None and linear(torch.zeros(1, 3)).abs().max() == 0
    assert not weights.can_add_bias(nn.Embedding(4, 2))
    with pytest.raises(TypeError, match="cannot add a bias"):
        weights.set_bias(nn.Embedding(4, 2), torch.zeros(2))


def test_merge_refuses_when_a_needed_bias_cannot_be_added():
    class Shift(AdapterLayer):
        def adapt(self, x, y):
            return y + 1.0

        def merged_weight(self, weight):
            return weight

        def merged_bias(self, bias):  # None in, a tensor out: merging needs a bias the base lacks
            return (torch.zeros(2) if bias is None else bias) + 1.0

    class NoBias(nn.Linear):
        def peftkit_get_weight(self):  # an opaque (quantized-style) base: no bias can be added to it
            return self.weight.detach()

    layer = Shift(NoBias(3, 2, bias=False))
    with pytest.raises(MergeError, match="has none"):
        layer.merge()
    assert layer.base.bias is None and not layer.merged
