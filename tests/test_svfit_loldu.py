"""SVFit (methods.md 2.4) and LoLDU (2.5) against hand-written float64 references on small tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.methods.diagonal_basis import add_diagonal_low_rank
from peftkit.methods.loldu import LoLDUConfig, ldu_factors
from peftkit.methods.svfit import SVFitConfig


def _layer_model(kind: str = "linear", d_in: int = 12, d_out: int = 7, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Sequential(nn.Linear(d_in, d_out))
    layer = Conv1D(d_out, d_in)  # stores (d_in, d_out)
    nn.init.normal_(layer.weight, std=0.3)
    nn.init.normal_(layer.bias, std=0.1)
    return nn.Sequential(layer)


def _w_b(model: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical (d_out, d_in) float64 weight and bias of the model's only layer, read by hand."""
    layer = model[0]
    w = layer.weight.detach().double()
    return (w.T if isinstance(layer, Conv1D) else w).clone(), layer.bias.detach().double().clone()


def _perturb(*params: torch.Tensor, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _svd(w):
    return torch.linalg.svd(w, full_matrices=False)  # float64 reference, independent of the layer's


def _lu_ldu(w):
    """Hand LDU: P, L, D, U with U of unit diagonal (w full rank here)."""
    p, lower, upper = torch.linalg.lu(w)
    d = upper.diagonal().clone()
    return p, lower, d, upper / d[:, None]


# --- SVFit -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_svfit_forward_equals_residual_plus_scaled_top_singular_triplets(kind):
    model = _layer_model(kind)
    w0, b0 = _w_b(model)
    peftkit.apply(model, SVFitConfig(r=3, targets=["0"]))
    layer = model[0]
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x).double(), x.double() @ w0.T + b0, atol=1e-5, rtol=0)  # identity at init
    _perturb(layer.sigma)
    u, s, vh = _svd(w0)
    sigma = layer.sigma.detach().double()
    w_res = w0 - u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    w = w_res + u[:, :3] @ torch.diag(sigma) @ vh[:3]  # the paper's W = W_res + U_r diag(sigma') V_r^T
    torch.testing.assert_close(model(x).double(), x.double() @ w.T + b0, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.delta_weight().double(), w - w0, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.sigma0.double(), s[:3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_svfit_gradient_is_u_g_v(kind):
    """dL/dsigma'_i = u_i^T G v_i with G = dL/dW; here L = sum y^2, so G = 2 y^T x by hand."""
    model = _layer_model(kind)
    w0, _ = _w_b(model)
    peftkit.apply(model, SVFitConfig(r=4, targets=["0"]))
    _perturb(model[0].sigma)
    x = torch.randn(9, 12)
    y = model(x)
    y.pow(2).sum().backward()
    g = 2 * y.detach().double().T @ x.double()  # (d_out, d_in)
    u, _, vh = _svd(w0)
    expected = torch.stack([u[:, i] @ g @ vh[i] for i in range(4)])
    torch.testing.assert_close(model[0].sigma.grad.double(), expected, atol=1e-4, rtol=1e-5)


def test_svfit_trains_r_values_per_layer_and_stores_no_weight_sized_buffer():
    model = _layer_model(d_in=40, d_out=30)
    peftkit.apply(model, SVFitConfig(r=5, targets=["0"]))
    layer = model[0]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.sigma"]
    assert peftkit.trainable_parameters(model).trainable == 5
    assert sum(b.numel() for b in layer.buffers()) == 5 * (40 + 30) + 5  # U_r, V_r^T, S_r: a rank-5 LoRA's size
    assert torch.equal(layer.base.weight, _layer_model(d_in=40, d_out=30)[0].weight)  # base left as it was


def _matrix_with_singular_values(s: list[float], d_out: int = 5, d_in: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d_in, d_out, generator=g, dtype=torch.float64))
    return q1 @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ q2.T


# s^2 = 9, 4, 1, .25, .01 (sum 14.26): cumulative shares .631, .912, .982, .9993, 1
@pytest.mark.parametrize(("energy", "r"), [(0.5, 1), (0.9, 2), (0.912, 3), (0.95, 3), (0.99, 4), (1.0, 5)])
def test_svfit_energy_picks_the_smallest_rank_holding_that_share(energy, r):
    model = nn.Sequential(nn.Linear(8, 5))
    with torch.no_grad():
        model[0].weight.copy_(_matrix_with_singular_values([3, 2, 1, 0.5, 0.1]))
    peftkit.apply(model, SVFitConfig(energy=energy, targets=["0"]))
    assert model[0].r == r and peftkit.trainable_parameters(model).trainable == r
    torch.testing.assert_close(model[0].sigma0, torch.tensor([3, 2, 1, 0.5, 0.1])[:r], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg", [SVFitConfig(energy=1.0, targets=["0"]), SVFitConfig(r=7, targets=["0"])])
def test_svfit_full_rank_leaves_no_residual(cfg):
    model = _layer_model(d_in=12, d_out=7)
    w0, _ = _w_b(model)
    peftkit.apply(model, cfg)
    layer = model[0]
    assert layer.r == 7
    top = (layer.basis_out.double() * layer.sigma0.double()) @ layer.basis_in.double()
    torch.testing.assert_close(w0 - top, torch.zeros_like(w0), atol=1e-5, rtol=0)  # W_res ~ 0


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"r": -2}, {"r": 2.5}, {"energy": 0.0}, {"energy": 1.5},
                                    {"energy": -0.1}])
def test_svfit_bad_configs_raise(kwargs):
    with pytest.raises(peftkit.ConfigError):
        SVFitConfig(**kwargs)


@pytest.mark.parametrize("cfg", [SVFitConfig(r=8, targets=["0"]), LoLDUConfig(r=8, targets=["0"])])
def test_rank_above_the_layer_raises_at_apply_and_leaves_the_model(cfg):
    model = _layer_model(d_in=12, d_out=7)
    with pytest.raises(peftkit.ConfigError, match=r"min\(d_in, d_out\) = 7"):
        peftkit.apply(model, cfg)
    assert isinstance(model[0], nn.Linear) and model[0].weight.requires_grad


# --- LoLDU -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 7), (7, 12), (12, 7)])
def test_ldu_factors_reconstruct_w0_in_fp32(shape):
    """P L (D U) == W0 within 1e-5 in fp32, U of unit diagonal, P^T (P L) unit lower triangular."""
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    k = min(shape)
    b, d, a = ldu_factors(w0, k)
    torch.testing.assert_close(((b.float() * d.float()) @ a.float()), w0, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.diagonal(), torch.ones(k, dtype=torch.float64))
    p, lower, upper = torch.linalg.lu(w0.double())
    torch.testing.assert_close(p.T @ b, lower)
    torch.testing.assert_close(d, upper.diagonal())


def _loldu_reference(w0, r, z0, z, s0, s):
    p, lower, _, u = _lu_ldu(w0)
    pl = p @ lower[:, :r]
    w_res = w0 - s0 * pl @ torch.diag(z0) @ u[:r]
    return w_res + s * pl @ torch.diag(z) @ u[:r], pl, u[:r]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("train_scale", [False, True])
def test_loldu_forward_equals_residual_plus_scaled_ldu(kind, train_scale):
    model = _layer_model(kind)
    w0, b0 = _w_b(model)
    peftkit.apply(model, LoLDUConfig(r=5, alpha=2.0, targets=["0"], train_scale=train_scale))
    layer = model[0]
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x).double(), x.double() @ w0.T + b0, atol=1e-5, rtol=0)
    d = _lu_ldu(w0)[2]
    torch.testing.assert_close(layer.z0.double(), d[:5], atol=1e-6, rtol=1e-6)  # "lu" init: z = D_r
    _perturb(layer.z, *([layer.scale] if train_scale else []))
    s = float(layer.scale.detach()) if train_scale else 2.0 / 5
    w, _, _ = _loldu_reference(w0, 5, d[:5], layer.z.detach().double(), 2.0 / 5, s)
    torch.testing.assert_close(model(x).double(), x.double() @ w.T + b0, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.delta_weight().double(), w - w0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_loldu_gradient_is_scaled_diagonal_of_l_p_g_u(kind):
    """dL/dz_i = s (L_r^T P^T G U_r^T)_ii and, with train_scale, dL/ds = sum_i z_i (L_r^T P^T G U_r^T)_ii."""
    model = _layer_model(kind)
    w0, _ = _w_b(model)
    peftkit.apply(model, LoLDUConfig(r=6, alpha=3.0, targets=["0"], train_scale=True))
    layer = model[0]
    _perturb(layer.z, layer.scale)
    x = torch.randn(9, 12)
    y = model(x)
    y.pow(2).sum().backward()
    g = 2 * y.detach().double().T @ x.double()
    p, lower, _, u = _lu_ldu(w0)
    core = (lower[:, :6].T @ p.T @ g @ u[:6].T).diagonal()
    s = float(layer.scale.detach())
    torch.testing.assert_close(layer.z.grad.double(), s * core, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.scale.grad.double(), (layer.z.detach().double() * core).sum(), atol=1e-4,
                               rtol=1e-5)


def _rank_deficient(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "product":  # rank 2 in fp32: pivots at round-off level
        return torch.randn(6, 2, generator=g) @ torch.randn(2, 6, generator=g)
    if kind == "repeated-rows":  # exactly zero pivots
        w = torch.randn(3, 6, generator=g)
        return torch.cat([w, w])
    return torch.zeros(6, 6)


@pytest.mark.parametrize("kind", ["product", "repeated-rows", "zero"])
def test_loldu_rank_deficient_weight_gives_no_nan(kind):
    model = nn.Sequential(nn.Linear(6, 6))
    with torch.no_grad():
        model[0].weight.copy_(_rank_deficient(kind))
    w0 = model[0].weight.detach().clone()
    peftkit.apply(model, LoLDUConfig(targets=["0"]))  # full rank, so every zero pivot is inside r
    layer = model[0]
    for t in (layer.basis_out, layer.basis_in, layer.z, layer.z0):
        assert torch.isfinite(t).all()
    torch.testing.assert_close((layer.basis_out * layer.pivots) @ layer.basis_in, w0, atol=1e-5, rtol=0)
    _perturb(layer.z)
    y = model(torch.randn(4, 6))
    y.pow(2).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(layer.z.grad).all()


@pytest.mark.parametrize("init", ["lu", "uniform", "normal", "constant", "ones", "zeros"])
def test_loldu_every_init_is_the_identity_and_sets_z0(init):
    model = _layer_model()
    w0, b0 = _w_b(model)
    torch.manual_seed(1)
    peftkit.apply(model, LoLDUConfig(r=5, targets=["0"], init=init))
    layer = model[0]
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x).double(), x.double() @ w0.T + b0, atol=1e-5, rtol=0)
    d = _lu_ldu(w0)[2][:5].float()
    expected = {"lu": d, "constant": d.mean().expand(5), "ones": torch.ones(5), "zeros": torch.zeros(5)}
    if init in expected:
        torch.testing.assert_close(layer.z0, expected[init], atol=1e-6, rtol=1e-6)
    elif init == "uniform":
        assert (layer.z0.abs() <= d.mean().abs() / 2 + 1e-6).all() and layer.z0.std() > 0
    torch.testing.assert_close(layer.z.detach(), layer.z0)


@pytest.mark.parametrize(("train_scale", "count"), [(False, 7), (True, 8)])
def test_loldu_trainable_count(train_scale, count):
    model = _layer_model()  # 12 -> 7: full rank 7
    peftkit.apply(model, LoLDUConfig(targets=["0"], train_scale=train_scale))
    assert peftkit.trainable_parameters(model).trainable == count
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == ({"0.z", "0.scale"} if train_scale else {"0.z"})


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"r": 1.5}, {"alpha": 0.0}, {"alpha": float("inf")}, {"init": "lora"}])
def test_loldu_bad_configs_raise(kwargs):
    with pytest.raises(peftkit.ConfigError):
        LoLDUConfig(**kwargs)


# --- the shared kernel and dtypes -------------------------------------------------------------
def test_diagonal_low_rank_kernel_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    a = torch.randn(3, 6, generator=g, dtype=torch.float64)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(add_diagonal_low_rank(x @ w.T, x, a, b, e), x @ (w + b @ torch.diag(e) @ a).T)
    assert torch.autograd.gradcheck(lambda x, e: add_diagonal_low_rank(x @ w.T, x, a, b, e), (x, e))


@pytest.mark.parametrize("cfg", [SVFitConfig(r=4), LoLDUConfig(r=4)], ids=["svfit", "loldu"])
def test_bf16_base_with_fp32_adapter_and_autocast(cfg):
    model = _layer_model(d_in=16, d_out=12)
    reference = _layer_model(d_in=16, d_out=12)
    peftkit.apply(reference, cfg)
    model.to(torch.bfloat16)
    peftkit.apply(model, cfg)
    layer = model[0]
    assert layer.basis_in.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    with torch.no_grad():  # same move on both, so the bf16 model should track the fp32 one
        for ref, p in zip(reference[0].adapter_parameters().values(), layer.adapter_parameters().values(),
                          strict=True):
            ref.add_(0.5)
            p.add_(0.5)
    x = torch.randn(4, 16)
    y = model(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference(x), atol=0.05, rtol=0.02)
    y.float().pow(2).sum().backward()
    grad = next(iter(layer.adapter_parameters().values())).grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reference(x)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()


def _saved_numel(model: nn.Module, x: torch.Tensor) -> int:
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(sizes)


@pytest.mark.parametrize("cfg", [SVFitConfig(r=8, targets=["0"]), LoLDUConfig(r=8, targets=["0"])],
                         ids=["svfit", "loldu"])
def test_backward_saves_no_more_than_lora_of_the_same_rank(cfg):
    x = torch.randn(64, 48, requires_grad=True)
    lora = peftkit.apply(_layer_model(d_in=48, d_out=40), peftkit.LoRAConfig(r=8, targets=["0"]))
    ours = peftkit.apply(_layer_model(d_in=48, d_out=40), cfg)
    assert _saved_numel(ours, x) <= _saved_numel(lora, x)
