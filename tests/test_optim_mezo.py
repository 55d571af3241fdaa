"""MeZO and Sparse MeZO (methods.md §7.1-7.2): zeroth-order steps, records, replay, masks, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load, save

import peftkit
from peftkit.optim import MeZO
from peftkit.optim import mezo as mezo_module
from peftkit.optim.mezo import ZerothOrderClosureError, replay
from peftkit.train.checkpoint import flatten_optimizer, unflatten_optimizer

from tiny_models import MLP, example_inputs, tiny_llama


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().double()


def _closure(model, seed: int = 1):
    x = example_inputs("mlp", batch=8, seed=seed)["x"].double()
    target = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda: ((model(x) - target) ** 2).mean()


def _values(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _z(seed: int, params) -> list[torch.Tensor]:
    """z of a step, regenerated as the docstring defines it: one generator seeded once, parameters in order."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.numel(), generator=gen, dtype=p.dtype).view_as(p) for p in params]


def test_lr0_step_restores_theta_through_exactly_the_documented_arithmetic():
    model = _mlp()
    before = _values(model)
    seen = []
    loss = _closure(model)

    def closure():
        seen.append(_values(model))
        return loss()

    opt = MeZO(model.parameters(), lr=0.0, eps=1e-3)
    opt.step(closure)
    (seed, g), = opt.records
    assert g != 0.0  # the two losses differed: θ really moved
    for p, b, z, plus, minus in zip(model.parameters(), before, _z(seed, before), *seen, strict=True):
        assert torch.equal(plus, b.clone().add_(z, alpha=1e-3))  # the closure saw θ + εz, then θ − εz
        assert torch.allclose(minus, b - 1e-3 * z, rtol=0, atol=1e-15)
        ref = b.clone().add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
        assert torch.equal(p.detach(), ref)
        # in-place float arithmetic is not invertible bit for bit; it comes back within ulps
        ulp = torch.finfo(b.dtype).eps * (b.abs() + 1e-3 * z.abs())
        assert ((p.detach() - b).abs() <= 4 * ulp).all()


def test_no_grad_is_ever_allocated_and_loss_decreases():
    model = _mlp()
    opt = MeZO(model.parameters(), lr=5e-3, eps=1e-3)
    loss = _closure(model)
    start = float(loss().detach())
    for _ in range(300):
        opt.step(loss)
    assert all(p.grad is None for p in model.parameters())
    assert float(loss().detach()) < 0.7 * start  # 1.43 -> 0.77 when written


def test_z_is_generated_in_chunks_and_never_as_large_as_a_parameter(monkeypatch):
    model = _mlp()
    closure = _closure(model)
    monkeypatch.setattr(mezo_module, "CHUNK", 64)
    sizes = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: sizes.append(a[0]) or real(*a, **k))
    MeZO(model.parameters(), lr=1e-3).step(closure)
    assert max(sizes) == 64 and sum(sizes) == 3 * sum(p.numel() for p in model.parameters())


def test_spsa_estimate_points_along_the_true_gradient_on_a_quadratic():
    """Mean of 10k g·z on ½(θ−c)ᵀA(θ−c), d=10, anisotropic A: cosine > 0.95 and the right length."""
    gen = torch.Generator().manual_seed(0)
    a = torch.linspace(1.0, 10.0, 10, dtype=torch.float64)
    c = torch.randn(10, generator=gen, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.randn(10, generator=gen, dtype=torch.float64))
    true_grad = a * (theta.detach() - c)
    opt = MeZO([theta], lr=0.0, eps=1e-4)
    for _ in range(10_000):
        opt.step(lambda: 0.5 * (a * (theta - c) ** 2).sum())
    n = len(opt.records)
    minus_mean = torch.zeros(10, dtype=torch.float64)
    replay([minus_mean], opt.records, round_trip=False, lr=1.0 / n, eps=1e-4)  # 0 − (1/n) Σ g z
    estimate = -minus_mean
    assert torch.nn.functional.cosine_similarity(estimate, true_grad, dim=0) > 0.95
    assert 0.9 < estimate.norm() / true_grad.norm() < 1.1  # the right length too (a factor 2 would fail)
    one = torch.zeros(10, dtype=torch.float64)
    replay([one], opt.records[:1], round_trip=False, lr=1.0, eps=1e-4)
    assert torch.nn.functional.cosine_similarity(-one, true_grad, dim=0) < 0.9  # one sample is not enough


@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_replaying_records_from_the_start_reproduces_the_run_bitwise(sparsity):
    model = _mlp()
    start = copy.deepcopy(model)
    hp = {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1, "sparsity": sparsity}
    opt = MeZO(model.parameters(), **hp)
    for step in range(20):
        opt.step(_closure(model, seed=step))
    assert not torch.equal(model.fc1.weight, start.fc1.weight)  # the run moved θ
    replay(start.parameters(), opt.records, **hp)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters(), strict=True))


def test_sparse_mezo_touches_exactly_the_smallest_entries_and_leaves_the_rest_bit_identical():
    model = _mlp()
    before = _values(model)
    opt = MeZO(model.parameters(), lr=1e-2, eps=1e-3, sparsity=0.75)
    opt.step(_closure(model))
    for p, b in zip(model.parameters(), before, strict=True):
        changed = p.detach() != b
        k = round(0.25 * b.numel())
        assert int(changed.sum()) == k  # perturbed fraction = 1 − sparsity, to the entry
        smallest = torch.zeros(b.numel(), dtype=torch.bool)
        smallest[b.abs().flatten().argsort()[:k]] = True
        assert torch.equal(changed.flatten(), smallest)
    for step in range(10):
        opt.step(_closure(model, seed=step))
    for p, b in zip(model.parameters(), before, strict=True):
        untouched = b.abs() > opt.state[p]["threshold"]
        assert untouched.any() and torch.equal(p.detach()[untouched], b[untouched])


def test_sparsity_zero_through_the_mask_equals_mezo_bitwise():
    dense, sparse, other = _mlp(), _mlp(), _mlp()
    opts = [MeZO(dense.parameters(), lr=1e-2, weight_decay=0.1),
            MeZO(sparse.parameters(), lr=1e-2, weight_decay=0.1, sparsity=1e-12),  # k = n: mask all ones
            MeZO(other.parameters(), lr=1e-2, weight_decay=0.1, sparsity=0.5)]
    for step in range(5):
        for model, opt in zip((dense, sparse, other), opts, strict=True):
            opt.step(_closure(model, seed=step))
    assert opts[1].state[next(sparse.parameters())]["threshold"] == float("inf")  # the mask path ran
    assert all(torch.equal(a, b) for a, b in zip(dense.parameters(), sparse.parameters(), strict=True))
    assert not torch.equal(dense.fc1.weight, other.fc1.weight)


def test_kth_smallest_abs_is_exact_in_every_float_dtype():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(1000, generator=gen).to(dtype)
        x[:100] = 0.0  # ties, and -0.0 next to 0.0
        x[100:150] = -0.0
        x[150:200] = x[200:250]
        for k in (1, 149, 150, 151, 300, 777, 1000):
            assert mezo_module.kth_smallest_abs(x, k) == x.abs().double().kthvalue(k).values.to(dtype)


def test_kth_smallest_abs_across_chunks(monkeypatch):
    monkeypatch.setattr(mezo_module, "CHUNK", 64)
    x = torch.randn(50, 41, generator=torch.Generator().manual_seed(3)) * 0.02
    for k in (1, 1000, 2050):
        assert mezo_module.kth_smallest_abs(x, k) == x.abs().flatten().kthvalue(k).values


def test_mezo_trains_only_a_lora_adapters_parameters():
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = example_inputs("llama", batch=2, seq=8)
    opt = MeZO([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-2)
    for _ in range(3):
        opt.step(lambda: model(**batch, labels=batch["input_ids"]).loss)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in trained.items())
    assert all(p.grad is None for p in model.parameters())


def test_closures_that_need_gradients_fail_clearly_and_leave_theta_restored():
    model = _mlp()
    before = _values(model)
    loss = _closure(model)
    opt = MeZO(model.parameters(), lr=1e-2)

    def backward_closure():
        value = loss()
        value.backward()
        return value

    def enable_grad_backward():
        with torch.enable_grad():
            return backward_closure()

    def graph_closure():
        with torch.enable_grad():
            return loss()

    for bad, match in [(backward_closure, "called backward"), (enable_grad_backward, "allocated .grad"),
                       (graph_closure, "autograd graph")]:
        with pytest.raises(ZerothOrderClosureError, match=match):
            opt.step(bad)
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.allclose(p, b, rtol=0, atol=1e-15) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.steps == 0 and opt.records == []
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(lambda: torch.tensor(float("nan")))


def test_bad_hyperparameters_are_refused():
    params = list(_mlp().parameters())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MeZO(params, sparsity=1.0)
    with pytest.raises(ValueError, match="same eps"):
        MeZO([{"params": params[:2], "eps": 1e-2}, {"params": params[2:]}])
    with pytest.raises(ValueError, match="eps > 0"):
        MeZO(params, eps=0.0)


def test_state_dict_round_trip_through_a_checkpoint_resumes_bitwise():
    def groups(model):
        ps = list(model.parameters())
        return [{"params": ps[:4], "sparsity": 0.6}, {"params": ps[4:], "weight_decay": 0.0}]

    hp = {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1, "seed": 7}
    straight = _mlp()
    opt = MeZO(groups(straight), **hp)
    for step in range(4):
        opt.step(_closure(straight, seed=step))
    resumed = copy.deepcopy(straight)
    tensors, meta = flatten_optimizer(opt.state_dict())  # as the training loop's checkpoint stores it
    tensors = load(save(tensors))
    fresh = MeZO(groups(resumed), lr=0.5, eps=1e-3, seed=123)  # different seed and lr: the state wins
    fresh.load_state_dict(unflatten_optimizer(tensors, meta, fresh.state_dict()))
    assert fresh.steps == 4 and fresh.records == opt.records
    for step in range(4, 8):
        opt.step(_closure(straight, seed=step))
        fresh.step(_closure(resumed, seed=step))
    assert fresh.records == opt.records
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))


def test_bf16_parameters_keep_their_dtype_and_threshold():
    model = _mlp().to(torch.bfloat16)
    opt = MeZO(model.parameters(), lr=1e-2, eps=1e-2, sparsity=0.5)
    opt.step(lambda: model(torch.ones(2, 16, dtype=torch.bfloat16)).float().pow(2).mean())
    p = model.fc1.weight
    assert p.dtype == torch.bfloat16 and opt.state[p]["threshold"].dtype == torch.bfloat16
