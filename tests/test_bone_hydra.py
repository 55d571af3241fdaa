"""Bone and Hydra against hand-written references on small tensors (methods.md 2.7 and 2.8), and Bone's
round trip with Hugging Face peft's MiSS (init_weights="bat") in both directions."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.methods.bone import BlockAffineLinear, BoneConfig
from peftkit.methods.hydra import BiasedLowRankAdd, HydraConfig, add_biased_low_rank

from tiny_models import MODELS, example_inputs, output_of


def _randomize(params, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _linear(d_in, d_out, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).to(dtype)


def _adapter_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    model(x).pow(2).sum().backward()
    return x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# === Bone ==========================================================================================
def bone_reference_weight(w0: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W_ij = W0_ij + W0_ij b_i + b_i, block by block."""
    r = b.shape[-1]
    w = w0.clone()
    for i in range(w0.shape[0] // r):
        for j in range(w0.shape[1] // r):
            block = w0[i * r:(i + 1) * r, j * r:(j + 1) * r]
            w[i * r:(i + 1) * r, j * r:(j + 1) * r] = block + block @ b[i] + b[i]
    return w


def test_bone_forward_and_gradients_match_the_block_formula():
    model = _linear(12, 8)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.apply(model, BoneConfig(r=4, targets=["0"]))
    blocks = model[0].bone_blocks
    assert blocks.shape == (2, 4, 4)
    _randomize([blocks])
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    dx, grads = _adapter_grads(model, x)
    # reference: plain autograd through the materialised block formula
    b = blocks.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y = xr @ bone_reference_weight(w0, b).T + b0
    torch.testing.assert_close(model(x), y, atol=1e-12, rtol=0)
    y.pow(2).sum().backward()
    torch.testing.assert_close(dx, xr.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(grads["0.bone_blocks"], b.grad, atol=1e-10, rtol=0)


def test_bone_function_gradcheck_with_bias():
    w0 = torch.randn(8, 12, dtype=torch.float64)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    blocks = (0.3 * torch.randn(2, 4, 4, dtype=torch.float64)).requires_grad_(True)
    def bone(x, bias, blocks):
        return BlockAffineLinear.apply(x, w0, bias, blocks)

    assert torch.autograd.gradcheck(bone, (x, bias, blocks))


def test_bone_identity_at_init_is_exact():
    model = _linear(16, 8, dtype=torch.float32)
    x = torch.randn(4, 16)
    base = model(x).detach()
    peftkit.apply(model, BoneConfig(r=4, targets=["0"]))
    assert torch.count_nonzero(model[0].bone_blocks) == 0
    assert torch.equal(model(x), base)


def test_bone_conv1d_uses_the_canonical_layout():
    model = MODELS["gpt2"](0)
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D stores (d_in, d_out) = (32, 128)
    w0, b0 = conv.weight.detach().T.clone(), conv.bias.detach().clone()
    peftkit.apply(model, BoneConfig(r=8, targets=["h.0.mlp.c_fc"]))
    layer = model.transformer.h[0].mlp.c_fc
    assert layer.bone_blocks.shape == (16, 8, 8)
    _randomize([layer.bone_blocks], scale=0.1)
    x = torch.randn(2, 3, 32)
    expected = x @ bone_reference_weight(w0, layer.bone_blocks.detach()).T + b0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_bone_merge_unmerge_restores_w0():
    model = _linear(16, 8, dtype=torch.float32)
    w0 = model[0].weight.detach().clone()
    peftkit.apply(model, BoneConfig(r=4, targets=["0"]))
    _randomize([model[0].bone_blocks], scale=0.2)
    x = torch.randn(6, 16)
    with torch.no_grad():
        unmerged = model(x)
        peftkit.merge(model)
        want = bone_reference_weight(w0, model[0].bone_blocks.detach())
        torch.testing.assert_close(model[0].base.weight, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
        peftkit.unmerge(model)
    torch.testing.assert_close(model[0].base.weight, w0, atol=1e-6, rtol=0)


def test_bone_unmerge_with_singular_block_raises_and_keeps_the_merge():
    model = _linear(8, 8, dtype=torch.float32)
    peftkit.apply(model, BoneConfig(r=4, targets=["0"]))
    with torch.no_grad():
        model[0].bone_blocks[1] = -torch.eye(4)  # I + b_1 = 0
    peftkit.merge(model)
    merged = model[0].base.weight.detach().clone()
    with pytest.raises(peftkit.MergeError, match="singular"):
        peftkit.unmerge(model)
    assert model[0].merged and torch.equal(model[0].base.weight, merged)


def test_bone_trainable_count_is_d_out_r():
    model = MODELS["llama"](0)
    peftkit.apply(model, BoneConfig(r=8, targets=["q_proj", "down_proj"]))
    # per block: q_proj (32 -> 32), down_proj (64 -> 32): d_out r = 32 * 8 each
    assert peftkit.trainable_parameters(model).trainable == 2 * (32 * 8 + 32 * 8)


@pytest.mark.parametrize("r", [0, -4, 2.0, True])
def test_bone_rank_must_be_a_positive_integer(r):
    with pytest.raises(peftkit.ConfigError, match="positive integer"):
        BoneConfig(r=r)


def test_bone_block_size_must_divide_the_layer():
    model = MODELS["mlp"](0)  # fc1 16 -> 32, fc2 32 -> 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = r"r=5 must divide d_in=16 and d_out=32 of fc1.*\[1, 2, 4, 8, 16\]"
    with pytest.raises(peftkit.ConfigError, match=message):
        peftkit.apply(model, BoneConfig(r=5, targets=["fc1", "fc2"]))
    assert not peftkit.has_adapter(model)
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(peftkit.ConfigError, match="must divide"):
        peftkit.apply(MODELS["mlp"](0), BoneConfig(r=64, targets=["fc1"]))  # r larger than the layer


def hydra_reference(layer, x, w0, b0, masks=(None, None)):
    """h + s F_par(x) + s F_seq(h), F(u) = B drop(A u + a) + c, written out (masks: seq, par)."""
    h = x @ w0.T + (0 if b0 is None else b0)
    s = layer.scaling
    out = h
    for name, u, mask in (("seq", h, masks[0]), ("par", x, masks[1])):
        a, a_bias, b, b_bias = layer.branch(name)
        hid = u @ a.T + (0 if a_bias is None else a_bias)
        hid = hid if mask is None else hid * mask
        out = out + s * (hid @ b.T + (0 if b_bias is None else b_bias))
    return out


def _hydra_model(bias=True, **cfg):
    model = _linear(12, 8, bias=bias)
    w0 = model[0].weight.detach().clone()
    b0 = model[0].bias.detach().clone() if bias else None
    peftkit.apply(model, HydraConfig(targets=["0"], **{"r": 3, "seq_r": 2, "scaling": 0.7, **cfg}))
    _randomize(model[0].adapter_parameters().values())
    return model, w0, b0


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_hydra_forward_and_gradients_match_the_two_branch_formula(bias):
    model, w0, b0 = _hydra_model(bias)
    layer = model[0]
    assert (layer.par_down_bias is not None) == bias and (layer.seq_up_bias is not None) == bias
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    dx, grads = _adapter_grads(model, x)
    xr = x.clone().requires_grad_(True)
    y = hydra_reference(layer, xr, w0, b0)
    torch.testing.assert_close(model(x), y, atol=1e-12, rtol=0)
    model.zero_grad(set_to_none=True)
    y.pow(2).sum().backward()
    torch.testing.assert_close(dx, xr.grad, atol=1e-10, rtol=0)
    for name, param in layer.adapter_parameters().items():
        torch.testing.assert_close(grads[f"0.{name}"], param.grad, atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_hydra_dropout_sits_between_down_and_up(bias):
    model, w0, b0 = _hydra_model(bias, dropout=0.4)
    layer = model[0].train()
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.manual_seed(5)
    dx, grads = _adapter_grads(model, x)
    torch.manual_seed(5)  # the layer draws one (tokens, r + r_s) keep-mask: parallel columns, then sequential
    mask = torch.empty(7, 3 + 2, dtype=torch.float64).bernoulli_(0.6) / 0.6
    masks = (mask[:, 3:], mask[:, :3])  # (seq, par), as hydra_reference takes them
    assert all(0 < int((m == 0).sum()) < m.numel() for m in masks)
    xr = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    hydra_reference(layer, xr, w0, b0, masks).pow(2).sum().backward()
    torch.testing.assert_close(dx, xr.grad, atol=1e-10, rtol=0)
    for name, param in layer.adapter_parameters().items():
        torch.testing.assert_close(grads[f"0.{name}"], param.grad, atol=1e-10, rtol=0, msg=name)


def _biased_low_rank_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"y": (5, 4), "x": (5, 6), "down": (3, 6), "down_bias": (3,), "up": (4, 3), "up_bias": (4,)}
    return {k: torch.randn(v, generator=g, dtype=torch.float64, requires_grad=k != "y") for k, v in shapes.items()}


def test_biased_low_rank_add_gradcheck():
    t = _biased_low_rank_inputs()

    def add(x, down, down_bias, up, up_bias):
        torch.manual_seed(0)  # the same dropout mask on every call
        return BiasedLowRankAdd.apply(t["y"].clone(), x, down, down_bias, up, up_bias, 0.7, 0.4)

    assert torch.autograd.gradcheck(add, tuple(v for k, v in t.items() if k != "y"))


def test_biased_low_rank_add_out_of_place_path_agrees():
    """Mixed dtypes (a float32 x here) take the out-of-place path: same mask, same result, same gradients."""
    t = _biased_low_rank_inputs()
    params = [v for k, v in t.items() if k not in ("y", "x")]
    results = []
    for x in (t["x"], t["x"].float()):
        torch.manual_seed(1)
        out = add_biased_low_rank(t["y"].clone(), x, *params, 0.7, 0.4)
        results.append((out, torch.autograd.grad(out.pow(2).sum(), params)))
    (fast, g_fast), (slow, g_slow) = results
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    for a, b in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_hydra_gpt2_conv1d_sequential_gradient():
    """The sequential branch's dA is rebuilt from x and W0; check it on the Conv1D layout."""
    model = MODELS["gpt2"](0).double()
    conv = model.transformer.h[0].attn.c_proj
    w0, b0 = conv.weight.detach().T.clone(), conv.bias.detach().clone()
    peftkit.apply(model, HydraConfig(r=2, targets=["h.0.attn.c_proj"]))
    layer = model.transformer.h[0].attn.c_proj
    _randomize(layer.adapter_parameters().values())
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    params = list(layer.adapter_parameters().values())
    got = torch.autograd.grad(layer(x).pow(2).sum(), params)
    want = torch.autograd.grad(hydra_reference(layer, x, w0, b0).pow(2).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_hydra_merge_formula_equals_the_two_branch_forward(bias):
    """(core's merge works in float32, even for this float64 layer: hence the 1e-6 tolerances)"""
    model, w0, b0 = _hydra_model(bias)
    layer = model[0]
    f = {n: p.detach() for n, p in layer.adapter_parameters().items()}
    s = layer.scaling
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
        peftkit.merge(model)
        merged = model(x)
    want_w = w0 + s * (f["par_up"] @ f["par_down"] + f["seq_up"] @ f["seq_down"] @ w0)
    torch.testing.assert_close(layer.base.weight, want_w, atol=1e-6, rtol=0)
    if bias:
        seq_b = f["seq_up"] @ f["seq_down"] @ b0 + f["seq_up"] @ f["seq_down_bias"] + f["seq_up_bias"]
        want_b = b0 + s * (f["par_up"] @ f["par_down_bias"] + f["par_up_bias"]) + s * seq_b
        torch.testing.assert_close(layer.base.bias, want_b, atol=1e-6, rtol=0)
    else:
        assert layer.base.bias is None
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    with torch.no_grad():
        peftkit.unmerge(model)
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)
    if bias:
        torch.testing.assert_close(layer.base.bias, b0, atol=1e-6, rtol=0)


def test_hydra_fp32_merge_unmerge_within_1e6():
    model = MODELS["bert"](0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.apply(model, HydraConfig(r=4, scaling=0.5))
    _randomize([p for p in model.parameters() if p.requires_grad], scale=0.1)
    peftkit.unmerge(peftkit.merge(model))
    for k, v in peftkit.unload(model).state_dict().items():
        torch.testing.assert_close(v, base[k], atol=1e-6, rtol=0)


def test_hydra_unmerge_with_singular_sequential_map_raises():
    model, _, _ = _hydra_model(seq_r=1, scaling=0.5)
    layer = model[0]
    with torch.no_grad():
        layer.seq_down.zero_()[0, 0] = 1.0
        layer.seq_up.zero_()[0, 0] = -2.0  # I + s B_s A_s has a zero eigenvalue
    peftkit.merge(model)
    with pytest.raises(peftkit.MergeError, match="singular"):
        peftkit.unmerge(model)
    assert layer.merged


def test_hydra_init_is_the_identity_with_xavier_down_projections():
    model = _linear(12, 8, dtype=torch.float32)
    x = torch.randn(3, 12)
    base = model(x).detach()
    peftkit.apply(model, HydraConfig(r=4, targets=["0"]))
    layer = model[0]
    assert torch.equal(model(x), base)
    for name, d_in in (("par_down", 12), ("seq_down", 8)):
        bound = (6 / (4 + d_in)) ** 0.5  # xavier-uniform
        w = getattr(layer, name)
        assert w.abs().max() <= bound and w.abs().max() > bound / 2, name
    zero_init = [p for n, p in layer.adapter_parameters().items() if not n.endswith("_down")]
    assert all(torch.count_nonzero(p) == 0 for p in zero_init)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_hydra_trainable_count(bias):
    model = _linear(12, 8, bias=bias)
    peftkit.apply(model, HydraConfig(r=3, seq_r=2, targets=["0"]))
    expected = 3 * (12 + 8) + 2 * 2 * 8 + ((3 + 2 + 2 * 8) if bias else 0)
    assert peftkit.trainable_parameters(model).trainable == expected


@pytest.mark.parametrize("changes", [{"r": 0}, {"seq_r": -1}, {"r": 1.5}, {"dropout": 1.0}, {"dropout": -0.1},
                                     {"scaling": float("nan")}])
def test_hydra_bad_configs(changes):
    with pytest.raises(peftkit.ConfigError):
        HydraConfig(**changes)


def test_hydra_default_targets_are_the_output_projections():
    model = peftkit.apply(MODELS["llama"](0), HydraConfig())
    assert sorted({n.split(".")[-1] for n in model.peftkit_state.adapted}) == ["down_proj", "o_proj"]


# === both =========================================================================================
@pytest.mark.parametrize("cfg", [BoneConfig(r=8), HydraConfig(r=2, targets="all-linear")],
                         ids=["bone", "hydra"])
def test_bf16_autocast_on_an_fp32_model(cfg):
    """Under autocast the products run in bf16 (cast once), the adapter stays fp32 and gets fp32 gradients."""
    model = peftkit.apply(MODELS["llama"](0), cfg)
    _randomize([p for p in model.parameters() if p.requires_grad], scale=0.1)
    inputs = example_inputs("llama")
    with torch.no_grad():
        reference = output_of(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = output_of(model, inputs)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - reference).abs().max() / reference.abs().max()).item() < 3e-2
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
