"""RandLoRA (methods.md 2.6) and DiffuseKronA (2.9) against hand-written references on small tensors.

References are written out independently of the implementation: RandLoRA's update as an explicit sum of
rank-one terms over the flattened index (peft's pairing of B's (n, k) columns with A_hat's (k, n) rows),
DiffuseKronA's as `x @ torch.kron(A, B).T`. Gradients are compared with autograd through those references,
in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core import weights
from peftkit.methods.kronecker import DiffuseKronAConfig, add_kron, factor_pair
from peftkit.methods.randlora import RandLoRAConfig

from tiny_models import MLP, MODELS, example_inputs, output_of


def _perturb(model, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _mlp(dtype=torch.float32) -> MLP:
    torch.manual_seed(0)
    return MLP().to(dtype).eval()


# --- RandLoRA -------------------------------------------------------------------------------------
def randlora_reference(layer) -> torch.Tensor:
    """delta W by the definition: sum over the flattened index c of B_flat[:, c] A_flat[c, :], where
    column c of B_flat is basis (n, k) = divmod(c, r) and row c of A_flat is (k, n) = divmod(c, N)."""
    a, b = layer.bases.a.double(), layer.bases.b.double()  # (r, 1, d_min_model), (d_max_model, N_model, r)
    lam, gam = layer.randlora_lambda.detach().double(), layer.randlora_gamma.detach().double()
    r, n_bases = lam.shape
    d_min, d_max = gam.shape[1], max(layer.d_in, layer.d_out)
    core = torch.zeros(d_max, d_min, dtype=torch.float64)
    for c in range(r * n_bases):
        n_b, k_b = divmod(c, r)
        k_a, n_a = divmod(c, n_bases)
        row = lam[k_a, n_a] * a[k_a, 0, :d_min] * gam[n_a]
        core += torch.outer(b[:d_max, n_b, k_b], row)
    delta = core if layer.d_in <= layer.d_out else core.T
    return layer.scaling * delta


def test_randlora_count_is_160_on_the_toy_mlp():
    model = peftkit.apply(_mlp(), RandLoRAConfig(r=4, targets=["fc1", "fc2"]))
    # each layer: d_min = 16, N = 4: r N + N d_min = 16 + 64
    assert peftkit.trainable_parameters(model).trainable == 160


def test_randlora_identity_at_init_and_init_values():
    model = _mlp()
    x = torch.randn(5, 16)
    base = model(x)
    peftkit.apply(model, RandLoRAConfig(r=4, targets=["fc1", "fc2"]))
    assert torch.equal(model(x), base)
    assert torch.count_nonzero(model.fc1.randlora_lambda) == 0
    assert torch.allclose(model.fc1.randlora_gamma, torch.full((4, 16), 1 / 16))


@pytest.mark.parametrize("targets", [["fc1", "fc2"], ["fc2"]])
def test_randlora_update_matches_the_definition(targets):
    model = _mlp(torch.float64)
    peftkit.apply(model, RandLoRAConfig(r=3, alpha=5.0, targets=targets))
    _perturb(model)
    with torch.no_grad():
        for name in targets:
            layer = model.get_submodule(name)
            delta = randlora_reference(layer)
            torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-12, rtol=0)
            h = torch.randn(4, 7, layer.d_in, dtype=torch.float64)
            w0, b0 = layer.base.weight, layer.base.bias
            torch.testing.assert_close(layer(h), h @ (w0 + delta).T + b0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind,targets", [("mlp", ["fc1", "fc2"]), ("gpt2", ["c_attn", "mlp.c_proj"])])
def test_randlora_gradients_match_autograd_through_the_definition(kind, targets):
    """The fused Function's dL/dx, dLambda, dGamma against autograd on W0 x + s delta x (both orientations)."""
    model = peftkit.apply(MODELS[kind]().double(), RandLoRAConfig(r=3, alpha=4.0, targets=targets))
    _perturb(model)
    layers = [model.get_submodule(name) for name in model.peftkit_state.adapted]
    assert {layer.transposed for layer in layers} == {False, True}  # d_in < d_out and d_in > d_out
    for layer in layers:
        x = torch.randn(2, 5, layer.d_in, dtype=torch.float64, requires_grad=True)
        ours = torch.autograd.grad(layer(x).pow(2).sum(), (x, layer.randlora_lambda, layer.randlora_gamma))
        u, a = layer.factors()  # reference: the explicit sum, differentiable in Lambda and Gamma
        lam, gam = layer.randlora_lambda, layer.randlora_gamma
        rows = (lam[:, :, None] * a[:, None, :] * gam[None]).reshape(-1, layer.d_min)
        core = u @ rows
        delta = layer.scaling * (core if layer.d_in <= layer.d_out else core.T)
        w0, b0 = weights.get_weight(layer.base), layer.base.bias
        ref = torch.autograd.grad((x @ (w0 + delta).T + b0).pow(2).sum(), (x, lam, gam))
        for got, want in zip(ours, ref, strict=True):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_randlora_update_is_full_rank():
    """With random non-zero Lambda, Gamma: rank(delta W) = d_min (LoRA of rank r would give <= r)."""
    model = peftkit.apply(_mlp(torch.float64), RandLoRAConfig(r=4, targets=["fc1", "fc2"]))
    _perturb(model, scale=1.0)
    for layer in (model.fc1, model.fc2):
        assert torch.linalg.matrix_rank(layer.delta_weight().detach()) == 16 > layer.r


def test_randlora_bases_are_shared_seeded_and_never_saved(tmp_path):
    first = peftkit.apply(MODELS["llama"](), RandLoRAConfig(r=4, targets=["q_proj", "up_proj", "down_proj"]))
    layers = [m for m in first.modules() if hasattr(m, "randlora_lambda")]
    assert len(layers) == 6 and all(m.bases is layers[0].bases for m in layers)  # one copy for the model
    assert layers[0].bases.a.shape == (4, 1, 64) and layers[0].bases.b.shape == (64, 16, 4)  # largest (out, in)
    u_q, _ = layers[0].factors()
    assert u_q.untyped_storage().data_ptr() == layers[0].bases.b.untyped_storage().data_ptr()  # a view
    assert not any("bases" in k for k in first.state_dict())
    again = peftkit.apply(MODELS["llama"](), RandLoRAConfig(r=4, targets=["q_proj", "up_proj", "down_proj"]))
    other = peftkit.apply(MODELS["llama"](), RandLoRAConfig(r=4, seed=1, targets=["q_proj", "up_proj", "down_proj"]))
    base_of = lambda m: next(x for x in m.modules() if hasattr(x, "randlora_lambda")).bases  # noqa: E731
    assert torch.equal(base_of(again).b, layers[0].bases.b) and torch.equal(base_of(again).a, layers[0].bases.a)
    assert not torch.equal(base_of(other).b, layers[0].bases.b)
    _perturb(first)
    peftkit.save(first, tmp_path)
    from safetensors.torch import load_file

    assert all("lambda" in k or "gamma" in k for k in load_file(tmp_path / "adapter.safetensors"))
    loaded = peftkit.load(MODELS["llama"](), tmp_path)
    assert torch.equal(base_of(loaded).b, layers[0].bases.b)
    inputs = example_inputs("llama")
    torch.testing.assert_close(output_of(loaded, inputs), output_of(first, inputs), atol=1e-6, rtol=0)


def test_randlora_saves_no_weight_sized_tensor_for_backward():
    """Everything the fused Function keeps is x, the diagonals, or storage that already existed (W0, bases)."""
    model = peftkit.apply(_mlp(), RandLoRAConfig(r=4, targets=["fc1"]))
    layer = model.fc1
    x = torch.randn(3, 16, requires_grad=True)
    existing = {t.untyped_storage().data_ptr() for t in (x, layer.base.weight, layer.bases.a, layer.bases.b,
                                                         layer.randlora_lambda, layer.randlora_gamma)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert saved and all(t.untyped_storage().data_ptr() in existing for t in saved)


def test_randlora_merge_unmerge_exact():
    model = peftkit.apply(_mlp(), RandLoRAConfig(r=4, alpha=4.0, targets=["fc1", "fc2"]))
    _perturb(model)
    w0 = model.fc1.base.weight.detach().clone()
    delta = randlora_reference(model.fc1).float()
    x = torch.randn(6, 16)
    with torch.no_grad():
        unmerged = model(x)
        peftkit.merge(model)
        torch.testing.assert_close(model.fc1.base.weight, w0 + delta, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
        peftkit.unmerge(model)
    torch.testing.assert_close(model.fc1.base.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,zeros", [("sparse", 2 / 3), ("very_sparse", 1 - 1 / 8)])
def test_randlora_sparse_bases_are_ternary(kind, zeros):
    """P(0) = 2/3 (sparse) or 1 - 1/sqrt(d_min) (very sparse; d_min = 64 for up/down_proj's largest shape)."""
    model = peftkit.apply(MODELS["llama"](), RandLoRAConfig(r=2, bases=kind, targets=["up_proj", "down_proj"]))
    bases = model.model.layers[0].mlp.up_proj.bases
    assert bases.b.shape == (64, 32, 2)
    for t in (bases.a, bases.b):
        values = torch.unique(t)
        assert len(values) == 3 and torch.allclose(values[0], -values[2]) and values[1] == 0
        assert abs(t.std().item() - 1) < 1e-5
    assert abs((bases.b == 0).float().mean().item() - zeros) < 0.03  # 4096 draws


def test_randlora_bf16_model_keeps_exact_bases():
    model = peftkit.apply(MODELS["llama"](), RandLoRAConfig(r=2, bases="sparse", targets=["q_proj"]))
    bases = model.model.layers[0].self_attn.q_proj.bases
    a, b = bases.a.clone(), bases.b.clone()
    model.to(torch.bfloat16)
    again = bases.tensors()
    assert again[0].dtype == torch.float32 and torch.equal(again[0], a) and torch.equal(again[1], b)


def test_randlora_dropout_only_in_training():
    model = peftkit.apply(_mlp(), RandLoRAConfig(r=4, alpha=4.0, dropout=0.5, targets=["fc1"]))
    _perturb(model)
    x = torch.randn(8, 16)
    with torch.no_grad():
        evaluated = model(x)
        delta = model.fc1.delta_weight()
        expected = model.head(torch.relu(model.fc2(torch.relu(model.fc1.base(x) + x @ delta.T))))
    torch.testing.assert_close(evaluated, expected, atol=1e-5, rtol=0)
    model.train()
    model(x).sum().backward()
    assert model.fc1.randlora_gamma.grad is not None


@pytest.mark.parametrize("changes,match", [({"r": 0}, "positive integer"), ({"r": 2.5}, "positive integer"),
                                           ({"bases": "dense-ish"}, "unknown RandLoRA bases"),
                                           ({"dropout": 1.0}, "dropout")])
def test_randlora_bad_configs_raise(changes, match):
    with pytest.raises(peftkit.ConfigError, match=match):
        RandLoRAConfig(**changes)


# --- DiffuseKronA ---------------------------------------------------------------------------------
def test_factor_pair_hand_examples():
    assert factor_pair(384) == (16, 24) and factor_pair(1024) == (32, 32) and factor_pair(127) == (1, 127)
    assert factor_pair(128, 4) == (4, 32) and factor_pair(128, 64) == (64, 2)  # a dividing factor is taken as is
    assert factor_pair(384, 20) == (16, 24) and factor_pair(384, 10) == (8, 48)  # else: largest divisor <= it


@pytest.mark.parametrize("shape", [(2, 5, 12), (7, 12)])
def test_kron_efficient_forward_equals_dense_kron(shape):
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(5, 3)  # d_out = 15, d_in = 12
    x, y = torch.randn(*shape), torch.randn(*shape[:-1], 15)
    expected = y + 0.5 * x @ torch.kron(a, b).T
    torch.testing.assert_close(add_kron(y.clone(), x, a, b, 0.5), expected, atol=1e-5, rtol=0)


def test_kron_gradients_match_autograd_through_kron():
    torch.manual_seed(1)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(15, 8, dtype=torch.float64)
    g = torch.randn(2, 3, 15, dtype=torch.float64)
    ours = torch.autograd.grad(add_kron(x @ w0.T, x, a, b, 0.7), (x, a, b), g)
    ref = torch.autograd.grad(x @ w0.T + 0.7 * x @ torch.kron(a, b).T, (x, a, b), g)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("trainable", [("x",), ("a",), ("b",), ("a", "b"), ("x", "b")])
def test_kron_gradients_of_any_subset_match_the_dense_reference(trainable):
    """Backward computes only what is asked (first layer: no dL/dx; frozen factors), and each part alone is right."""
    torch.manual_seed(3)
    t = {"a": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(2, 5, dtype=torch.float64),
         "x": torch.randn(6, 15, dtype=torch.float64)}
    for k in trainable:
        t[k].requires_grad_(True)
    g = torch.randn(6, 8, dtype=torch.float64)
    ours = torch.autograd.grad(add_kron(torch.zeros(6, 8, dtype=torch.float64), t["x"], t["a"], t["b"], 0.3),
                               [t[k] for k in trainable], g)
    ref = torch.autograd.grad(0.3 * t["x"] @ torch.kron(t["a"], t["b"]).T, [t[k] for k in trainable], g)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_kron_mixed_dtypes_bf16_output_fp32_factors():
    torch.manual_seed(2)
    a, b = torch.randn(4, 2, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    x = torch.randn(3, 8).bfloat16()
    y = add_kron(torch.zeros(3, 8, dtype=torch.bfloat16), x, a, b, 1.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ torch.kron(a, b).T.detach(), atol=3e-2, rtol=1e-2)
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and torch.isfinite(b.grad).all()


def test_kron_layer_identity_at_init_count_and_delta():
    model = _mlp()
    x = torch.randn(5, 16)
    base = model(x)
    peftkit.apply(model, DiffuseKronAConfig(alpha=0.5, targets=["fc1", "fc2"]))
    assert torch.equal(model(x), base)
    assert model.fc1.kron_A.shape == (4, 4) and model.fc1.kron_B.shape == (8, 4)  # 32 = 4 x 8, 16 = 4 x 4
    assert torch.count_nonzero(model.fc1.kron_B) == 0 and torch.count_nonzero(model.fc1.kron_A) == 16
    assert peftkit.trainable_parameters(model).trainable == (16 + 32) * 2  # a1 a2 + b1 b2 per layer
    _perturb(model)
    layer = model.fc1
    torch.testing.assert_close(layer.delta_weight(), 0.5 * torch.kron(layer.kron_A, layer.kron_B))
    with torch.no_grad():
        h = torch.randn(5, 16)
        torch.testing.assert_close(layer(h), layer.base(h) + 0.5 * h @ torch.kron(layer.kron_A, layer.kron_B).T,
                                   atol=1e-5, rtol=0)


def test_kron_init_std_is_one_over_a1():
    model = peftkit.apply(nn.Sequential(nn.Linear(512, 4096)), DiffuseKronAConfig(a1=64, a2=8, targets=["0"]))
    a = model[0].kron_A
    assert a.shape == (64, 8) and model[0].kron_B.shape == (64, 64)  # the reference's SD default shapes
    assert abs(a.std().item() - 1 / 64) < 0.15 / 64


def test_kron_rank_is_product_of_ranks_and_count_below_lora():
    torch.manual_seed(3)
    a = torch.randn(3, 2, dtype=torch.float64) @ torch.randn(2, 4, dtype=torch.float64)  # rank 2
    b = torch.randn(5, 3, dtype=torch.float64) @ torch.randn(3, 6, dtype=torch.float64)  # rank 3
    assert torch.linalg.matrix_rank(torch.kron(a, b)) == 6
    model = peftkit.apply(_mlp(torch.float64), DiffuseKronAConfig(targets=["fc1"]))
    _perturb(model, scale=1.0)
    rank = torch.linalg.matrix_rank(model.fc1.delta_weight().detach()).item()
    assert rank == 16  # (4x4) kron (8x4): 4 * 4, full rank
    kron_params = peftkit.trainable_parameters(model).trainable
    assert kron_params == 48 < rank * (16 + 32)  # LoRA of the same rank: r (d_in + d_out) = 768


@pytest.mark.parametrize("changes,match", [({"a1": 5}, "do not divide"), ({"a2": 3}, "do not divide"),
                                           ({"a1": 0}, "positive integer"), ({"factor": 0}, "factor must be")])
def test_kron_bad_configs_raise_at_apply_and_leave_the_model(changes, match):
    model = _mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.apply(model, DiffuseKronAConfig(targets=["fc1", "fc2"], **changes))
    assert not peftkit.has_adapter(model) and isinstance(model.fc1, nn.Linear)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
