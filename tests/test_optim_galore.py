"""GaLore and Natural GaLore (methods.md §7.3-7.4): GaLoreAdamW against AdamW, galore-torch and the math."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peftkit.optim import GaLoreAdamW, galore_param_groups
from peftkit.optim import galore as galore_module
from peftkit.optim.projection import natural_transform, orthogonal_basis, woodbury_inverse_fisher


def _mlp(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)  # shapes cover both projection sides (m ≥ n and m < n) and 1-D biases
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8),
                               torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _train(model, opt, steps: int, seed: int = 1, start: int = 0) -> None:
    """`steps` steps on fixed random batches (batch i depends on seed and i only, so runs can be split)."""
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        x = torch.randn(16, 12, generator=g, dtype=next(model.parameters()).dtype)
        loss = model(x).pow(2).mean() + model(x).sum() * 0.1
        opt.zero_grad()
        loss.backward()
        opt.step()


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_state_of_a_projected_weight_is_two_r_max_side_plus_the_projection():
    model = _mlp()
    opt = GaLoreAdamW(galore_param_groups(model, rank=4, update_proj_gap=5), lr=1e-2)
    _train(model, opt, 1)
    for layer in (model[0], model[2]):  # (24, 12): right projection; (8, 24): left projection
        m, n = layer.weight.shape
        state = opt.state[layer.weight]
        assert state["exp_avg"].numel() + state["exp_avg_sq"].numel() == 2 * 4 * max(m, n)
        assert state["projection"].numel() == 4 * min(m, n)
    assert opt.state[model[0].bias]["exp_avg"].shape == model[0].bias.shape  # plain AdamW for 1-D


def test_full_rank_identity_projection_equals_adamw(monkeypatch):
    """r = min(m, n), α = 1, P = I: GaLoreAdamW takes torch.optim.AdamW's steps (fp64, with weight decay)."""
    monkeypatch.setattr(galore_module, "orthogonal_basis",
                        lambda g, r, side, method: torch.eye(g.shape[1] if side == "right" else g.shape[0], dtype=g.dtype))
    ours, ref = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)
    opt = GaLoreAdamW(galore_param_groups(ours, rank=24, update_proj_gap=3, scale=1.0), lr=1e-2,
                      weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for i in range(6):
        _train(ours, opt, 1, start=i)
        _train(ref, opt_ref, 1, start=i)
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert not torch.equal(_params(ours)[0], _params(_mlp(dtype=torch.float64))[0])  # it did train


def test_projection_changes_only_every_T_steps_and_update_has_rank_at_most_r():
    model = _mlp(dtype=torch.float64)  # fp64, so that W's own rounding stays far below the rank tolerance
    opt = GaLoreAdamW(galore_param_groups(model, rank=3, update_proj_gap=4), lr=1e-2, weight_decay=0.0)
    w = model[0].weight
    seen, starts = [], [w.detach().clone()]
    for i in range(12):
        _train(model, opt, 1, start=i)
        seen.append(opt.state[w]["projection"].clone())
        if i % 4 == 3:
            starts.append(w.detach().clone())
    for i in range(1, 12):
        assert torch.equal(seen[i], seen[i - 1]) == (i % 4 != 0), f"step {i}"
    for a, b in zip(starts, starts[1:], strict=False):  # ΔW over each window of T steps lies in span(P)
        delta = b - a
        assert torch.linalg.matrix_rank(delta, rtol=1e-9).item() <= 3 < min(delta.shape)
        assert delta.abs().max() > 0


def test_one_dimensional_parameter_in_a_projected_group_is_refused_before_training():
    model = _mlp()
    with pytest.raises(ValueError, match=r"shape \(24,\).*galore_param_groups"):
        GaLoreAdamW([{"params": list(model.parameters()), "rank": 4}])
    opt = GaLoreAdamW([model[0].weight], rank=None)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):  # a group added later is checked too
        opt.add_param_group({"params": [model[2].bias], "rank": 2})
    with pytest.raises(ValueError, match="proj_type"):
        GaLoreAdamW([{"params": [model[0].weight], "rank": 4, "proj_type": "diagonal"}])


def test_woodbury_equals_the_dense_solve_in_fp64():
    g = torch.Generator().manual_seed(0)
    k, s, damping = 300, 20, 1e-3
    history = torch.randn(s, k, generator=g, dtype=torch.float64)
    vec = torch.randn(k, generator=g, dtype=torch.float64)
    dense = torch.linalg.solve(damping * torch.eye(k, dtype=torch.float64) + history.T @ history, vec)
    ours = woodbury_inverse_fisher(history, vec, damping)
    assert ((ours - dense).norm() / dense.norm()).item() < 1e-8


def test_woodbury_with_one_vector_equals_the_closed_form():
    g = torch.Generator().manual_seed(1)
    h, vec = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(2))
    damping = 1e-3
    closed = (vec - (vec @ h) / (damping + h @ h) * h) / damping
    torch.testing.assert_close(woodbury_inverse_fisher(h[None], vec, damping), closed, rtol=1e-10, atol=0)


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_natural_transform_forms_no_k_by_k_matrix():
    """Every intermediate of the transform has at most s·k elements (a k×k one would be k/s times more)."""
    k, s = 2048, 20
    ring = torch.randn(s, k, dtype=torch.float64)
    low = torch.randn(32, 64, dtype=torch.float64)
    gram = ring @ ring.T
    with _LargestOutput() as mode:
        natural_transform(low, ring, gram, s, 3, 1e-3)
    assert 0 < mode.largest <= s * k
    with _LargestOutput() as dense:  # the recorder sees a dense solve, so the check above can fail
        torch.linalg.solve(torch.eye(k, dtype=torch.float64) + ring.T @ ring, low.reshape(-1))
    assert dense.largest >= k * k


def test_natural_transform_with_its_cached_gram_equals_the_woodbury_of_the_fifo():
    """The ring buffer with H Hᵀ updated one row per step == Woodbury recomputed from the last s gradients."""
    s, shape = 4, (6, 5)
    ring, gram = torch.zeros(s, 30, dtype=torch.float64), torch.zeros(s, s, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    pushed = []
    for count in range(9):
        low = torch.randn(shape, generator=g, dtype=torch.float64)
        pushed.append(low.reshape(-1))
        out = natural_transform(low, ring, gram, min(count + 1, s), count % s, 1e-3)
        expected = woodbury_inverse_fisher(torch.stack(pushed[-s:]), low.reshape(-1), 1e-3)
        torch.testing.assert_close(out.reshape(-1), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("shape", [(200, 30), (30, 200)])
def test_gram_basis_spans_the_svd_basis(shape):
    """svd="gram" gives the same top-r singular vectors as the thin SVD, each up to its sign."""
    u, _ = torch.linalg.qr(torch.randn(shape[0], 30, generator=torch.Generator().manual_seed(3)))
    v, _ = torch.linalg.qr(torch.randn(shape[1], 30, generator=torch.Generator().manual_seed(4)))
    m, n = shape
    grad = (u[:, :min(m, n)] * torch.linspace(10, 1, min(m, n))) @ v[:, :min(m, n)].T  # distinct singular values
    side = "right" if m >= n else "left"
    exact, gram = orthogonal_basis(grad, 5, side, "svd"), orthogonal_basis(grad, 5, side, "gram")
    assert exact.shape == gram.shape
    overlap = exact @ gram.T if side == "right" else exact.T @ gram  # (r, r): ±1 on the diagonal
    torch.testing.assert_close(overlap.abs(), torch.eye(5), atol=1e-4, rtol=0)


def test_natural_galore_trains_and_keeps_a_fifo_of_s_gradients():
    model = _mlp()
    opt = GaLoreAdamW(galore_param_groups(model, rank=4, update_proj_gap=3, natural=True, history_size=5),
                      lr=1e-2)
    before = _params(model)
    _train(model, opt, 7)
    state = opt.state[model[0].weight]
    assert state["history"].shape == (5, 4 * 24) and state["history_count"] == 7
    assert all(not torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))


def test_same_steps_as_galore_torch():
    """Same seeds, rank, gap and scale: galore-torch's GaLoreAdamW and ours agree step by step (ε tiny, λ = 0:
    the two differ only in where ε sits and when the decay applies)."""
    import galore_torch  # a test dependency (tests/test_dependencies.py): missing, this fails
    ours, ref = _mlp(), _mlp()
    common = {"rank": 4, "update_proj_gap": 3, "scale": 0.25}
    opt = GaLoreAdamW(galore_param_groups(ours, **common), lr=1e-2, eps=1e-12, weight_decay=0.0)
    ref_groups = galore_param_groups(ref, **common, proj_type="std")
    ref_groups[1].pop("rank")  # galore-torch marks projected groups by the presence of the key
    opt_ref = galore_torch.GaLoreAdamW(ref_groups, lr=1e-2, eps=1e-12, weight_decay=0.0, no_deprecation_warning=True)
    for i in range(10):  # crosses three projection refreshes
        _train(ours, opt, 1, start=i)
        _train(ref, opt_ref, 1, start=i)
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(_params(ours)[0], _params(_mlp())[0])


@pytest.mark.parametrize("natural", [False, True])
def test_bf16_weights_train(natural):
    model = _mlp(dtype=torch.bfloat16)
    opt = GaLoreAdamW(galore_param_groups(model, rank=4, update_proj_gap=2, natural=natural), lr=1e-2)
    before = _params(model)
    _train(model, opt, 5)
    assert opt.state[model[0].weight]["projection"].dtype == torch.bfloat16
    for a, b in zip(before, _params(model), strict=True):
        assert torch.isfinite(b).all() and not torch.equal(a, b)


@pytest.mark.parametrize("natural", [False, True])
def test_resume_from_state_dict_equals_an_uninterrupted_run(natural):
    """10 steps == 4 steps, state_dict into a fresh optimizer (through the checkpoint's tensor/JSON split), 6 more."""
    from peftkit.train.checkpoint import flatten_optimizer, unflatten_optimizer

    def make(model):
        return GaLoreAdamW(galore_param_groups(model, rank=3, update_proj_gap=3, natural=natural, history_size=4),
                           lr=1e-2)

    whole = _mlp()
    _train(whole, make(whole), 10)
    cut = _mlp()
    opt = make(cut)
    _train(cut, opt, 4)
    tensors, meta = flatten_optimizer(opt.state_dict())
    saved = {k: v.clone() for k, v in tensors.items()}
    resumed = _mlp(seed=5)  # other starting values, overwritten by the checkpoint's
    resumed.load_state_dict(cut.state_dict())
    fresh = make(resumed)
    fresh.load_state_dict(unflatten_optimizer(saved, meta, fresh.state_dict()))
    assert fresh.state[resumed[0].weight]["step"] == 4
    _train(resumed, fresh, 6, start=4)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
