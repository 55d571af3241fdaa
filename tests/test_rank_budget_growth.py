"""The growing members of the rank-budget family (methods.md 2.2 IncreLoRA, 2.3 TriAdaptLoRA): forward and
scores against hand-written formulas, growth schedules, grown triplets in the optimizer, config errors.
AdaLoRA and the shared mechanism are tested in test_rank_budget.py, whose helpers this file reuses."""

from __future__ import annotations

import math

import pytest
import torch
from test_rank_budget import _perturb, _train_plain

import peftkit

from tiny_models import MODELS, example_inputs, output_of


# --- IncreLoRA ----------------------------------------------------------------------------------
def _mlp_increlora(**kw):
    from peftkit.methods.increlora import IncreLoRAConfig

    cfg = IncreLoRAConfig(**{"targets": ["fc1", "fc2"], "target_rank": 4, "top_h": 1, "init_warmup": 2,
                             "incre_interval": 2, "score_window": None, "alpha": 4.0, **kw})
    return peftkit.apply(MODELS["mlp"](), cfg)


def test_increlora_identity_at_init_exact_without_advance_learning_and_1e5_offset_with_it():
    x = example_inputs("mlp")
    base = output_of(MODELS["mlp"](), x)
    assert torch.equal(output_of(_mlp_increlora(advance_learning=False), x), base)
    model = _mlp_increlora().double()
    layer, h = model.fc1, x["x"].double()
    q, p = layer.lora_A[1], layer.lora_B[1]  # the reserve: rank_step = 2 triplets with lambda 1e-5
    offset = 4.0 / (1 + 1e-5) * (h @ (q * 1e-5).T @ p.T)
    torch.testing.assert_close(layer(h) - layer.base(h), offset, rtol=1e-6, atol=1e-18)
    assert offset.abs().max() <= 1e-5 * 4.0 * (h @ q.T @ p.T).abs().max()  # |y - y0| <= 1e-5 s |B A x|


def test_increlora_forward_after_growth_matches_the_formula():
    model = _mlp_increlora(max_r=5).double()
    layer = model.fc2
    _perturb(model)
    layer.grow(2)  # rank 3 = chunk 0 (1) + chunk 1 (2); the reserve is chunk 2 (2 triplets)
    q = torch.cat([layer.lora_A[0], layer.lora_A[1], layer.lora_A[2]])
    p = torch.cat([layer.lora_B[0], layer.lora_B[1], layer.lora_B[2]], dim=1)
    lam = torch.cat([layer.lora_E[0], layer.lora_E[1], torch.full((2, 1), 1e-5, dtype=torch.float64)])
    delta = 4.0 / (3 + 1e-5) * p @ (q * lam)
    h = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(h), h @ (layer.base.weight + delta).T + layer.base.bias)
    layer.stop_reserve()
    torch.testing.assert_close(layer.delta_weight(), 4.0 / (3 + 1e-5) * p[:, :3] @ (q[:3] * lam[:3]))


def test_increlora_module_score_matches_the_hand_formula():
    model = _mlp_increlora()
    _perturb(model)
    layer = model.fc1
    layer.capture_scores = True
    x = torch.randn(6, 16)
    dw = layer.delta_weight().detach().requires_grad_(True)  # reference: dL/d(dW) by autograd on explicit dW
    h = torch.relu(x @ (layer.base.weight + dw).T + layer.base.bias)
    model.head(torch.relu(model.fc2(h))).pow(2).sum().backward()
    reference = (dw.detach() * dw.grad).abs().sum() / math.sqrt(dw.numel())
    model.zero_grad()
    output_of(model, {"x": x}).pow(2).sum().backward()
    torch.testing.assert_close(layer.take_score(), reference)
    assert layer.take_score().item() == 0  # taken: reset


def test_increlora_growth_reaches_the_target_in_the_predicted_number_of_events():
    from peftkit.schedules.rank_budget import growth_events_needed

    model = _mlp_increlora()
    ranks = []
    schedule = _train_plain(model, steps=12, total=12, each_step=lambda step, s: ranks.append(s.total_rank()))
    initial, target = 2, 4 * 2
    assert sum(schedule.ranks().values()) - initial == target - initial
    assert schedule.counters["growth_events"] == growth_events_needed(initial, target, 1, 2) == 3
    assert ranks == [2, 2, 2, 4, 4, 6, 6, 8, 8, 8, 8, 8]  # growth at steps 4, 6, 8
    assert all(layer.reserve() == 0 for layer in schedule.layers.values())  # reserves leave at the end


def test_increlora_last_event_is_clipped_to_the_target():
    model = _mlp_increlora(target_rank=3, rank_step=4, max_r=8)  # remaining 4 with steps of 4, top_h 2
    schedule = _train_plain(model, steps=6, total=6)
    assert sum(schedule.ranks().values()) == 6


def test_increlora_grown_triplets_are_in_the_optimizer_and_train_from_their_growth_on():
    model = _mlp_increlora(max_r=7)  # chunks of 1, 2, 2, 2 triplets
    schedule = peftkit.schedule_for(model, total_steps=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    g = torch.Generator().manual_seed(0)
    for step in range(1, 13):
        layers = list(schedule.layers.values())
        before = [([e.detach().clone() for e in m.lora_E], [a.detach().clone() for a in m.lora_A]) for m in layers]
        used = [(m.active, m.active + m.reserve()) for m in layers]
        output_of(model, {"x": torch.randn(8, 16, generator=g)}).pow(2).mean().backward()
        schedule.step(step, opt)
        opt.step()
        opt.zero_grad()
        for m, (lams, qs), (active, forward) in zip(layers, before, used, strict=True):
            for chunk, start in enumerate((0, 1, 3, 5)):
                # lambda trains once its triplets are grown, Q (and P) from when they enter the forward
                assert (not torch.equal(m.lora_E[chunk], lams[chunk])) == (start < active), (step, chunk)
                assert (not torch.equal(m.lora_A[chunk], qs[chunk])) == (start < forward), (step, chunk)
                assert id(m.lora_E[chunk]) in in_optimizer
    assert sum(schedule.ranks().values()) == 8 and max(schedule.ranks().values()) >= 5


def test_increlora_unused_chunks_have_no_gradient_and_no_optimizer_state():
    model = _mlp_increlora(max_r=9)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    untouched = model.fc1.lora_A[3].detach().clone()
    output_of(model, {"x": torch.randn(4, 16)}).pow(2).sum().backward()
    opt.step()
    assert model.fc1.lora_A[3].grad is None and model.fc1.lora_E[1].grad is None  # not grown, reserve lambda
    assert model.fc1.lora_A[1].grad is not None  # the reserve's directions learn ahead
    assert torch.equal(model.fc1.lora_A[3], untouched) and model.fc1.lora_A[3] not in opt.state


def test_increlora_saved_after_growth_loads_the_same_model(tmp_path):
    model = _mlp_increlora()
    _train_plain(model, steps=5, total=12)
    peftkit.save(model, tmp_path)
    back = peftkit.load(MODELS["mlp"](), tmp_path)
    x = example_inputs("mlp")
    torch.testing.assert_close(output_of(back, x), output_of(model, x), atol=0, rtol=0)
    assert (back.fc1.active, back.fc1.reserving) == (model.fc1.active, model.fc1.reserving)


def test_increlora_bad_configurations_raise_early():
    from peftkit.methods.increlora import IncreLoRAConfig

    with pytest.raises(peftkit.ConfigError, match="needs 3 growth events, the last at step 8, after training ends"):
        peftkit.schedule_for(_mlp_increlora(), total_steps=7)
    with pytest.raises(peftkit.ConfigError, match="exceed min.* = 16 of fc1"):
        _mlp_increlora(max_r=20)
    with pytest.raises(peftkit.ConfigError, match="max_r=5 is below init_r/target_rank"):
        IncreLoRAConfig(target_rank=8, max_r=5)
    with pytest.raises(peftkit.ConfigError, match="target_rank >= init_r"):
        IncreLoRAConfig(init_r=4, target_rank=2)


# --- TriAdaptLoRA -------------------------------------------------------------------------------
def _mlp_triadapt(**kw):
    from peftkit.methods.triadaptlora import TriAdaptLoRAConfig

    cfg = TriAdaptLoRAConfig(**{"targets": ["fc1", "fc2"], "target_rank": 4, "init_warmup": 2, "incre_interval": 2,
                                "alpha": 4.0, "max_r": 7, **kw})
    return peftkit.apply(MODELS["mlp"](), cfg)


def _core_by_hand(layer) -> torch.Tensor:
    """C = L + U from the blocks: chunk i adds its rows to L (columns up to its end) and columns to U."""
    r, offset = layer.active, 0
    core = torch.zeros(r, r, dtype=torch.float64)
    for c_row, c_col in zip(layer.lora_C_row, layer.lora_C_col, strict=True):
        if offset >= r:
            break
        take = min(c_row.shape[0], r - offset)
        core[offset:offset + take, :offset + take] += c_row[:take, :offset + take]
        core[:offset + take, offset:offset + take] += c_col[:offset + take, :take]
        offset += c_row.shape[0]
    return core


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_triadapt_is_identity_at_init(kind):
    from peftkit.methods.triadaptlora import TriAdaptLoRAConfig

    model = MODELS[kind]()
    inputs = example_inputs(kind)
    with torch.no_grad():
        base = output_of(model, inputs)
        peftkit.apply(model, TriAdaptLoRAConfig(target_rank=4))
        assert torch.equal(output_of(model, inputs), base)


def test_triadapt_forward_is_b_times_lower_plus_upper_times_a():
    model = _mlp_triadapt().double()
    _perturb(model)
    layer = model.fc1  # chunks 1, 2, 2, 2
    for grown in (0, 2, 1):  # rank 1, 3, then 4 (chunk 2 half used)
        layer.grow(grown)
        core = _core_by_hand(layer)
        r = layer.active
        a, b = torch.cat(list(layer.lora_A))[:r], torch.cat(list(layer.lora_B), dim=1)[:, :r]
        delta = 4.0 / (r + 1e-5) * b @ core @ a
        h = torch.randn(3, 16, dtype=torch.float64)
        torch.testing.assert_close(layer(h), h @ (layer.base.weight + delta).T + layer.base.bias)
        torch.testing.assert_close(layer.delta_weight(), delta)
    # the split: L's part of chunk 1 lies on and below the block diagonal, U's on and above it
    lower = torch.zeros(4, 4, dtype=torch.float64)
    lower[1:3, :3] = layer.lora_C_row[1].detach()
    assert torch.all(torch.triu(lower, diagonal=2) == 0)


def test_triadapt_trainable_count_and_scores():
    model = _mlp_triadapt()
    # chunks (k, r_end) = (1, 1), (2, 3), (2, 5), (2, 7): k (d_in + d_out) + 2 k r_end, fc1 16->32, fc2 32->16
    assert peftkit.trainable_parameters(model).trainable == 2 * sum(k * 48 + 2 * k * e
                                                                     for k, e in ((1, 1), (2, 3), (2, 5), (2, 7)))
    schedule = peftkit.schedule_for(model, total_steps=20)
    _perturb(model)
    model.fc2.grow(2)
    scores = schedule.scores()
    expected = {n: (_core_by_hand(m).norm() / (1 if n == "fc1" else 2)).item() for n, m in schedule.layers.items()}
    assert scores == pytest.approx(expected, rel=1e-5)  # from 0 at init
    with torch.no_grad():
        model.fc1.lora_C_row[0].add_(1.0)
    assert schedule.scores()["fc1"] == pytest.approx(_core_by_hand(model.fc1).norm().item() - expected["fc1"], rel=1e-5)


def test_threshold_schedules_let_more_modules_grow_as_training_goes_on():
    from peftkit.schedules.rank_budget import modules_to_grow

    assert [modules_to_grow(40, u, "linear", 100) for u in (0.0, 0.25, 0.5, 1.0)] == [1, 10, 20, 40]
    assert [modules_to_grow(40, u, "exponential", 100) for u in (0.0, 0.5, 1.0)] == [1, int(40**0.5), 40]
    assert [modules_to_grow(40, u, "cosine", 100) for u in (0.0, 0.5, 1.0)] == [1, 20, 40]
    assert modules_to_grow(40, 1.0, "linear", 3) == 3


@pytest.mark.parametrize("threshold", ["linear", "exponential", "cosine"])
def test_triadapt_total_rank_only_grows_and_stays_within_the_budget(threshold):
    model = _mlp_triadapt(threshold=threshold)
    totals = []
    schedule = _train_plain(model, steps=20, total=20, each_step=lambda step, s: totals.append(s.total_rank()))
    assert all(a <= b for a, b in zip(totals, totals[1:], strict=False)) and totals[-1] <= 8
    assert totals[0] == 2 and totals[-1] > 2 and schedule.counters["growth_events"] >= 1
    grown = max(schedule.layers.values(), key=lambda m: m.active)
    assert 3 <= grown.active <= 5  # chunk 1 in use, chunk 3 not
    assert not torch.equal(grown.lora_C_row[1], torch.zeros_like(grown.lora_C_row[1]))  # trained since growth
    output_of(model, {"x": torch.randn(4, 16)}).pow(2).sum().backward()
    for params in (grown.lora_A, grown.lora_B, grown.lora_C_row, grown.lora_C_col):
        assert params[1].grad is not None and params[1].grad.abs().sum() > 0
        assert params[3].grad is None


def test_triadapt_bad_configurations_raise_early():
    from peftkit.methods.triadaptlora import TriAdaptLoRAConfig

    with pytest.raises(peftkit.ConfigError, match=r"first growth step \(4\) comes after training ends at step 3"):
        peftkit.schedule_for(_mlp_triadapt(), total_steps=3)
    with pytest.raises(peftkit.ConfigError, match="unknown threshold schedule 'step'"):
        TriAdaptLoRAConfig(threshold="step")
    with pytest.raises(peftkit.ConfigError, match="exceed min.* = 16 of fc1"):
        _mlp_triadapt(max_r=20)
