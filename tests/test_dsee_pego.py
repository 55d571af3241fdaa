"""DSEE (methods.md 2.10) and PEGO (2.11) against hand-written references on small tensors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core.layer import adapter_layers
from peftkit.core.schedule import schedule_for
from peftkit.methods import pego as pego_module
from peftkit.methods.dsee import DSEEConfig, grebsmo, mask_gradients, sparsify_weights
from peftkit.methods.pego import PEGOConfig, PEGOSchedule, orthogonality_penalty

from tiny_models import example_inputs, output_of, tiny_gpt2


def _linear(d_in=12, d_out=10, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def _randomize(*params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))


def _dense_sparse(index, values, d_out, d_in):
    """S ⊙ M written entry by entry."""
    dense = torch.zeros(d_out, d_in, dtype=values.dtype)
    for k, v in zip(index.tolist(), values, strict=True):
        dense[k // d_in, k % d_in] = v
    return dense


# --- DSEE ----------------------------------------------------------------------------------------
def test_dsee_forward_and_delta_match_the_formula():
    model = _linear().double()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.apply(model, DSEEConfig(r=3, alpha=6.0, num_sparse=7, support="random", targets=["0"]))
    layer = model[0]
    _randomize(layer.lora_A, layer.lora_B, layer.sparse_values)
    a, b, v = layer.lora_A.detach(), layer.lora_B.detach(), layer.sparse_values.detach()
    s = 6.0 / 3
    delta = s * (b @ a + _dense_sparse(layer.sparse_index, v, 10, 12))
    torch.testing.assert_close(layer.delta_weight().detach(), delta)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ (w0 + delta).T + b0)


def test_dsee_gradients_equal_the_masked_dense_gradient():
    """values.grad = (dL/dS_dense)[M]; the dense gradient outside M is non-zero, the update there is zero."""
    model = _linear().double()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.apply(model, DSEEConfig(r=2, alpha=3.0, num_sparse=9, support="magnitude", targets=["0"]))
    layer = model[0]
    _randomize(layer.lora_A, layer.lora_B, layer.sparse_values)
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 10, dtype=torch.float64)
    (model(x) - target).pow(2).sum().backward()
    # reference: a dense S (d_out, d_in) on the same forward
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    dense = _dense_sparse(layer.sparse_index, layer.sparse_values.detach(), 10, 12).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ((x_ref @ (w0 + 1.5 * (b @ a + dense)).T + b0) - target).pow(2).sum().backward()
    rows, cols = layer.sparse_index // 12, layer.sparse_index % 12
    torch.testing.assert_close(layer.sparse_values.grad, dense.grad[rows, cols])
    torch.testing.assert_close(x.grad, x_ref.grad)
    outside = torch.ones(120, dtype=torch.bool)
    outside[layer.sparse_index] = False
    assert dense.grad.flatten()[outside].abs().max() > 0  # the support is what keeps the rest at 0


def test_dsee_sparse_part_stays_on_its_support_after_training():
    model = _linear(16, 16)
    peftkit.apply(model, DSEEConfig(r=2, num_sparse=5, support="grebsmo", targets=["0"]))
    layer = model[0]
    support = set(layer.sparse_index.tolist())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    for _ in range(5):
        model(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        dense_s = (layer.delta_weight() / layer.scaling - layer.lora_B @ layer.lora_A).flatten()
    nonzero = set(torch.nonzero(layer.sparse_delta().flatten()).flatten().tolist())
    assert nonzero <= support and len(nonzero) == 5
    off = torch.tensor(sorted(set(range(256)) - support))
    assert dense_s[off].abs().max() < 1e-6  # the dense equivalent Delta W: B A only, off the support


@pytest.mark.parametrize("support", ["grebsmo", "magnitude", "random", "svd"])
def test_dsee_support_has_exactly_num_sparse_entries(support):
    model = tiny_gpt2()
    peftkit.apply(model, DSEEConfig(r=4, num_sparse=11, support=support))
    for layer in adapter_layers(model).values():
        d_out, d_in = layer.lora_B.shape[0], layer.lora_A.shape[1]
        index = layer.sparse_index
        assert index.dtype == torch.int64 and index.shape == (11,)
        assert len(set(index.tolist())) == 11 and 0 <= int(index.min()) and int(index.max()) < d_out * d_in
        assert layer.sparse_values.shape == (11,) and not layer.sparse_values.any()


def _planted(d_out=24, d_in=20, rank=2, spikes=6, seed=0):
    """A rank-`rank` matrix (entries ~1) plus `spikes` isolated entries of +-2 plus small noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
    where = torch.randperm(d_out * d_in, generator=g)[:spikes]
    sparse = torch.zeros(d_out * d_in)
    sparse[where] = 2.0 * torch.sign(torch.randn(spikes, generator=g))
    noise = 1e-3 * torch.randn(d_out, d_in, generator=g)
    return low + sparse.view(d_out, d_in) + noise, set(where.tolist())


@pytest.mark.parametrize("support", ["grebsmo", "svd"])
def test_dsee_decomposition_supports_find_planted_sparse_entries(support):
    w, spikes = _planted()
    model = nn.Sequential(nn.Linear(20, 24, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    peftkit.apply(model, DSEEConfig(r=2, num_sparse=6, support=support, decomposition_rank=2, threshold=1.0,
                                      targets=["0"]))
    assert set(model[0].sparse_index.tolist()) == spikes


def test_dsee_magnitude_support_is_the_largest_weights():
    model = _linear()
    order = model[0].weight.detach().abs().flatten().argsort(descending=True)
    peftkit.apply(model, DSEEConfig(r=2, num_sparse=8, support="magnitude", targets=["0"]))
    assert set(model[0].sparse_index.tolist()) == set(order[:8].tolist())


def test_grebsmo_splits_low_rank_and_sparse():
    w, spikes = _planted()
    torch.manual_seed(0)
    low_rank, sparse = grebsmo(w, rank=2, threshold=1.0)
    assert torch.linalg.matrix_rank(low_rank, atol=1e-3) == 2
    assert set(torch.nonzero(sparse.flatten()).flatten().tolist()) == spikes  # the rest is below the threshold
    torch.testing.assert_close(low_rank + sparse, w, atol=0.3, rtol=0)


def test_dsee_init_is_the_identity_with_gaussian_a():
    model = nn.Sequential(nn.Linear(256, 128))
    x = torch.randn(3, 256)
    base = model(x).detach()
    peftkit.apply(model, DSEEConfig(r=16, support="magnitude", targets=["0"]))
    layer = model[0]
    assert torch.equal(model(x), base)
    assert abs(layer.lora_A.std().item() - 0.02) < 2e-3 and abs(layer.lora_A.mean().item()) < 2e-3
    assert not layer.lora_B.any() and not layer.sparse_values.any()


def test_dsee_runs_under_bf16_autocast():
    model = _linear(16, 16)
    peftkit.apply(model, DSEEConfig(r=2, num_sparse=6, support="random", targets=["0"]))
    _randomize(model[0].lora_A, model[0].lora_B, model[0].sparse_values)
    x = torch.randn(4, 16)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and model[0].sparse_values.grad.abs().sum() > 0
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=17), "exceeds the layer"),
    (dict(num_sparse=200), "num_sparse=200 exceeds"),
    (dict(decomposition_rank=10), "decomposition_rank=10 must be below"),
    (dict(support="omp"), "unknown DSEE support"),
    (dict(num_sparse=-1), "non-negative"),
    (dict(threshold=-0.5), "threshold"),
])
def test_dsee_bad_configs_raise_at_apply(kwargs, message):
    with pytest.raises(peftkit.ConfigError, match=message):
        peftkit.apply(_linear(), DSEEConfig(**{"targets": ["0"], "r": 2, **kwargs}))


# --- DSEE stage 2: sparse final weights -------------------------------------------------------------
def test_sparsify_weights_gives_the_exact_density_and_keeps_the_largest():
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(10, 12, generator=g), "b.weight": torch.randn(7, 9, generator=g)}
    before = copy.deepcopy(state)
    pruned, masks = sparsify_weights(state, density=0.3)
    for k, w in state.items():
        kept = round(0.3 * w.numel())
        assert int(masks[k].sum()) == kept and int(torch.count_nonzero(pruned[k])) == kept
        threshold = w.abs().flatten().sort(descending=True).values[kept - 1]
        assert torch.equal(masks[k], w.abs() >= threshold)  # no ties in random data
        assert torch.equal(pruned[k], torch.where(masks[k], w, torch.zeros_like(w)))
        assert torch.equal(w, before[k])  # inputs untouched
    pruned, masks = sparsify_weights(state, density=0.25, scope="global")
    all_abs = torch.cat([w.abs().flatten() for w in state.values()])
    total = round(0.25 * all_abs.numel())
    assert sum(int(m.sum()) for m in masks.values()) == total
    threshold = all_abs.sort(descending=True).values[total - 1]
    for k, w in state.items():
        assert torch.equal(masks[k], w.abs() >= threshold)
    with pytest.raises(peftkit.ConfigError, match="density"):
        sparsify_weights(state, density=0.0)


def test_retuning_with_masks_keeps_pruned_weights_at_zero():
    model = _linear(16, 16)
    peftkit.apply(model, DSEEConfig(r=2, num_sparse=4, support="magnitude", targets=["0"]))
    _randomize(model[0].lora_B, model[0].sparse_values)
    plain = peftkit.unload(peftkit.merge(model))
    pruned, masks = sparsify_weights({"0.weight": plain.state_dict()["0.weight"]}, density=0.4)
    plain.load_state_dict(pruned, strict=False)
    handles = mask_gradients(plain, masks)
    opt = torch.optim.AdamW([plain[0].weight], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        plain(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    for h in handles:
        h.remove()
    weight = plain[0].weight.detach()
    assert torch.count_nonzero(weight[~masks["0.weight"]]) == 0
    assert not torch.equal(weight[masks["0.weight"]], pruned["0.weight"][masks["0.weight"]])


# --- PEGO ----------------------------------------------------------------------------------------
def _pego_model(n=3, r=2, alpha=None, d_in=12, d_out=10, dtype=torch.float64, **kwargs):
    model = _linear(d_in, d_out).to(dtype)
    peftkit.apply(model, PEGOConfig(r=r, num_modules=n, alpha=alpha, targets=["0"], **kwargs))
    _randomize(model[0].lora_A, model[0].lora_B)
    return model


def _modules(layer, n, r):
    """The group's (A_i, B_i) pairs, sliced by hand from the stacked factors."""
    return [(layer.lora_A[i * r:(i + 1) * r], layer.lora_B[:, i * r:(i + 1) * r]) for i in range(n)]


@pytest.mark.parametrize("alpha", [None, 3.0])
def test_pego_forward_and_merge_equal_the_summed_group(alpha):
    model = _pego_model(alpha=alpha)
    layer, s = model[0], (1.0 if alpha is None else alpha / 2)
    w0, b0 = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    expected = x @ w0.T + b0
    for a_i, b_i in _modules(layer, 3, 2):
        expected = expected + s * (x @ a_i.T) @ b_i.T
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
        peftkit.merge(model)  # core merges in float32
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def _dense_penalty(w, pairs, s):
    """The reference's loop, on dense d x d products."""
    deltas = [s * b_i @ a_i for a_i, b_i in pairs]
    total = 0
    for i, d_i in enumerate(deltas):
        total = total + (w @ d_i.T).abs().sum()
        for d_j in deltas[i + 1:]:
            total = total + (d_i @ d_j.T).abs().sum()
    return total


@pytest.mark.parametrize("alpha, chunk", [(None, 1 << 20), (3.0, 1 << 20), (None, 150)])
def test_pego_penalty_and_gradient_match_a_dense_reference(alpha, chunk, monkeypatch):
    monkeypatch.setattr(pego_module, "CHUNK_ELEMENTS", chunk)  # 150: one row of each (10, 10) product per chunk
    model = _pego_model(n=4, alpha=alpha)
    layer, s = model[0], (1.0 if alpha is None else alpha / 2)
    penalty = orthogonality_penalty(model)
    penalty.backward()
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    pairs = [(a[i * 2:(i + 1) * 2], b[:, i * 2:(i + 1) * 2]) for i in range(4)]
    reference = _dense_penalty(layer.base.weight.detach(), pairs, s)
    reference.backward()
    torch.testing.assert_close(penalty.detach(), reference.detach())
    torch.testing.assert_close(layer.lora_A.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.grad, b.grad)


def test_pego_penalty_under_bf16_autocast_is_the_full_precision_one():
    # the penalty is over the fp32 factors: autocast must not turn part of it into bf16 (mixed-dtype
    # chunk products raised before) nor round its sign pattern
    model = _pego_model(n=4, alpha=None, dtype=torch.float32)  # autocast leaves float64 alone
    expected = orthogonality_penalty(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = orthogonality_penalty(model)
    assert penalty.dtype == expected.dtype
    torch.testing.assert_close(penalty, expected)


def test_pego_is_the_identity_with_zero_penalty_at_init():
    model = _linear(32, 24)
    x = torch.randn(3, 32)
    base = model(x).detach()
    peftkit.apply(model, PEGOConfig(targets=["0"]))
    layer = model[0]
    assert torch.equal(model(x), base)
    penalty = orthogonality_penalty(model)
    assert penalty.item() == 0.0
    assert layer.lora_A.shape == (16, 32) and layer.lora_B.shape == (24, 16)
    assert layer.lora_A.abs().max() <= 1 / 32**0.5 and not layer.lora_B.any()  # kaiming_uniform(a=sqrt 5)


def test_pego_schedule_adds_the_weighted_penalty_gradient_in_a_plain_loop():
    model = _pego_model(n=3, dtype=torch.float32, ortho_lambda=0.01, penalty_every=2)
    reference = copy.deepcopy(model)
    schedule = schedule_for(model, total_steps=4)
    assert isinstance(schedule, PEGOSchedule)
    x = torch.randn(5, 12)
    grads = []
    for step in (1, 2):
        model.zero_grad()
        model(x).pow(2).sum().backward()
        schedule.step(step)
        grads.append(model[0].lora_B.grad.clone())
    layer = reference[0]
    task = torch.autograd.grad(reference(x).pow(2).sum(), layer.lora_B)[0]
    pairs = _modules(layer, 3, 2)
    with_penalty = torch.autograd.grad(reference(x).pow(2).sum()
                                       + 0.02 * _dense_penalty(layer.base.weight.detach(), pairs, 1.0), layer.lora_B)[0]
    torch.testing.assert_close(grads[0], with_penalty, rtol=1e-4, atol=1e-4)  # step 1: 2 lambda (every 2nd step, weighted by 2)
    torch.testing.assert_close(grads[1], task)  # step 2: no penalty
    assert schedule.state_dict() == {"steps_done": 2}


def test_pego_schedule_is_registered_for_gpt2_conv1d():
    model = tiny_gpt2()
    peftkit.apply(model, PEGOConfig(r=2, num_modules=2, targets=["c_attn", "c_fc"]))
    _randomize(*[p for p in model.parameters() if p.requires_grad])
    layer = model.transformer.h[0].attn.c_attn
    w = layer.base.weight.detach().T  # Conv1D stores (d_in, d_out)
    pairs = _modules(layer, 2, 2)
    torch.testing.assert_close(pego_module.layer_penalty(layer), _dense_penalty(w, pairs, 1.0), rtol=1e-4, atol=0)
    term = schedule_for(model).extra_loss(model)
    torch.testing.assert_close(term, 1e-3 * orthogonality_penalty(model))
    output_of(model, example_inputs("gpt2")).float().mean().backward()


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=4, num_modules=4), "exceeds the layer"),
    (dict(r=0), "positive integer"),
    (dict(penalty_every=0), "positive integer"),
    (dict(alpha=-1.0), "alpha"),
    (dict(ortho_lambda=-1.0), "ortho_lambda"),
])
def test_pego_bad_configs_raise_at_apply(kwargs, message):
    with pytest.raises(peftkit.ConfigError, match=message):
        peftkit.apply(_linear(), PEGOConfig(**{"targets": ["0"], "r": 2, "num_modules": 2, **kwargs}))
