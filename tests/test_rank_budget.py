"""The rank-budget family (methods.md 2.1-2.3): SVD-form layers, importance, budgets, allocation, schedules.

Every check compares against a hand-written formula on small tensors (float64 where useful) or against
a property the papers state (identity at init, budget totals, masked values exactly 0).
"""

from __future__ import annotations

import math

import pytest
import torch

import peftkit
from peftkit.methods.adalora import AdaLoRAConfig
from peftkit.schedules.rank_budget import (
    ImportanceEMA,
    cubic_budget,
    keep_top,
    orthogonality,
    resolve_total,
    sensitivity,
)
from peftkit.schedules.rank_budget_methods import AdaLoRASchedule

from tiny_models import MODELS, example_inputs, output_of


def _mlp_adalora(**kw):
    model = MODELS["mlp"]()
    cfg = AdaLoRAConfig(**{"init_r": 4, "target_r": 2, "targets": ["fc1", "fc2"], **kw})
    return peftkit.apply(model, cfg)


def _train_plain(model, steps: int, total: int, lr: float = 0.05, seed: int = 0, each_step=None):
    """A plain PyTorch loop: backward, `schedule.step`, optimizer step (masks land after it)."""
    schedule = peftkit.schedule_for(model, total_steps=total)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x = torch.randn(8, 16, generator=g)
        output_of(model, {"x": x}).pow(2).mean().backward()
        schedule.step(step, opt)
        opt.step()
        opt.zero_grad()
        if each_step is not None:
            each_step(step, schedule)
    return schedule


# --- the SVD-form layer -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_adalora_is_identity_at_init(kind):
    model = MODELS[kind]()
    inputs = example_inputs(kind)
    with torch.no_grad():
        base = output_of(model, inputs)
        peftkit.apply(model, AdaLoRAConfig(init_r=4, target_r=2))
        assert torch.equal(output_of(model, inputs), base)


def test_adalora_forward_and_delta_match_the_formula():
    model = _mlp_adalora(alpha=6.0).double()
    layer = model.fc1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_E, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    w0, b0 = layer.base.weight, layer.base.bias
    p, lam, q = layer.lora_B, layer.lora_E[:, 0], layer.lora_A
    delta = 6.0 / (4 + 1e-5) * p @ torch.diag(lam) @ q  # P diag(lambda) Q alpha / (ranknum + 1e-5)
    torch.testing.assert_close(layer(x), x @ (w0 + delta).T + b0)
    torch.testing.assert_close(layer.delta_weight(), delta)


def test_adalora_init_and_trainable_count():
    model = _mlp_adalora(init_r=3)
    layer = model.fc2
    assert torch.equal(layer.lora_E, torch.zeros(3, 1))
    assert 0.01 < layer.lora_A.std().item() < 0.03 and 0.01 < layer.lora_B.std().item() < 0.03
    # r (d_in + d_out) + r per layer: fc1 16->32, fc2 32->16
    assert peftkit.trainable_parameters(model).trainable == 2 * (3 * (16 + 32) + 3)


# --- importance, budget, allocation -------------------------------------------------------------
def test_importance_ema_matches_a_hand_computation():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    ema = ImportanceEMA(beta1=0.8, beta2=0.6)
    s_bar = u_bar = torch.zeros(2, 2)
    for grad in (torch.tensor([[1.0, 1.0], [-2.0, 0.0]]), torch.tensor([[0.5, -1.0], [1.0, 2.0]])):
        w.grad = grad
        ema.update("w", sensitivity(w))
        i = (w.detach() * grad).abs()
        s_bar = 0.8 * s_bar + 0.2 * i
        u_bar = 0.6 * u_bar + 0.4 * (i - s_bar).abs()
    torch.testing.assert_close(ema.score("w"), s_bar * u_bar)
    assert ema.score("never seen").item() == 0


def test_triplet_score_is_lambda_plus_row_and_column_means():
    model = _mlp_adalora()
    schedule = AdaLoRASchedule(model, model.peftkit_state.config, total_steps=10)
    g = torch.Generator().manual_seed(1)
    s = {k: torch.rand(shape, generator=g) for k, shape in
         (("lora_A", (4, 16)), ("lora_E", (4, 1)), ("lora_B", (32, 4)))}
    for k, v in s.items():  # beta 0.85: one update from zero gives I_bar = 0.15 I, U_bar = 0.15 * 0.85 I
        schedule.ema.update(f"fc1.{k}", v)
    expected = sum(0.15 * 0.1275 * t for t in (s["lora_E"][:, 0] ** 2, (s["lora_A"] ** 2).mean(1),
                                               (s["lora_B"] ** 2).mean(0)))
    torch.testing.assert_close(schedule.triplet_scores("fc1"), expected)


def test_cubic_budget_values_and_shape():
    args = dict(initial=48, target=16, tinit=10, tfinal=20, total=100)
    assert [cubic_budget(t, **args) for t in (0, 5, 10)] == [48, 48, 48]
    assert [cubic_budget(t, **args) for t in (80, 81, 100)] == [16, 16, 16]
    for t in range(11, 80):  # b(t) = b_T + (b_0 - b_T) (1 - (t - tinit) / (T - tfinal - tinit))^3, floored
        assert cubic_budget(t, **args) == math.floor(16 + 32 * (1 - (t - 10) / 70) ** 3)
    values = [cubic_budget(t, **args) for t in range(0, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    # cubic, not linear: a third of the way the budget has lost 1 - (2/3)^3 = 70% of its way
    assert cubic_budget(10 + 70 // 3, **args) - 16 < 0.31 * 32


def test_keep_top_keeps_exactly_the_budget_even_with_ties():
    scores = [torch.tensor([0.0, 3.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([5.0])]
    keeps = keep_top(scores, 3)
    assert [k.tolist() for k in keeps] == [[True, True, False], [False, False], [True]]
    assert sum(int(k.sum()) for k in keep_top(scores, 0)) == 0


def test_orthogonality_is_zero_for_orthonormal_factors_and_matches_the_formula():
    model = _mlp_adalora()
    layers = [model.fc1, model.fc2]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.linalg.qr(torch.randn(layer.d_out, 4))[0])  # orthonormal columns
            layer.lora_A.copy_(torch.linalg.qr(torch.randn(layer.d_in, 4))[0].T)  # orthonormal rows
    assert orthogonality(layers).item() < 1e-6
    with torch.no_grad():
        model.fc1.lora_A.mul_(2.0)  # Q Q^T = 4 I: ||3 I||_F = 3 sqrt(4) = 6, averaged over 4 matrices
    assert orthogonality(layers).item() == pytest.approx(6 / 4, abs=1e-5)


# --- the schedule -------------------------------------------------------------------------------
def test_after_the_schedule_the_kept_total_is_target_r_times_modules_and_masked_lambda_stay_zero():
    model = _mlp_adalora(tinit=2, tfinal=4, orth_reg_weight=0.1)
    seen = []

    def check(step, schedule):
        seen.append(sum(schedule.kept_ranks().values()))
        if step >= schedule.final_step:  # final phase: masked lambda exactly 0 after every step
            for layer in schedule.layers.values():
                assert torch.all(layer.lora_E[~layer.rank_mask] == 0)
                assert torch.all(layer.lora_E[layer.rank_mask] != 0)

    schedule = _train_plain(model, steps=16, total=16, each_step=check)
    assert seen[:2] == [8, 8] and seen[11:] == [4] * 5  # init budget until tinit, 2 x 2 from T - tfinal on
    assert all(a >= b for a, b in zip(seen, seen[1:], strict=False))
    assert [schedule.budget(t) for t in range(1, 17)] == seen
    assert peftkit.trainable_parameters(model).trainable == 2 * (4 * 48 + 4)  # slots stay: the optimizer's list is fixed


def test_schedule_step_adds_the_regularizer_gradient():
    model = _mlp_adalora(orth_reg_weight=0.3)
    twin = _mlp_adalora(orth_reg_weight=0.3)
    x = torch.randn(4, 16)
    output_of(model, {"x": x}).sum().backward()
    peftkit.schedule_for(model, total_steps=10).step(1, None)
    r = orthogonality([twin.fc1, twin.fc2])
    (output_of(twin, {"x": x}).sum() + 0.3 * r).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_bad_schedules_raise_when_created():
    model = _mlp_adalora(tinit=5, tfinal=5)
    with pytest.raises(peftkit.ConfigError, match=r"tinit \(5\) \+ tfinal \(5\) >= total steps \(10\)"):
        peftkit.schedule_for(model, total_steps=10)
    with pytest.raises(peftkit.ConfigError, match="needs the number of training steps"):
        peftkit.schedule_for(model)
    with pytest.raises(peftkit.ConfigError, match="tinit .* >= total steps"):
        AdaLoRAConfig(tinit=3, tfinal=2, total_steps=5)
    with pytest.raises(peftkit.ConfigError, match="training ends after 50 steps"):
        resolve_total(AdaLoRAConfig(total_steps=100), 50)
    with pytest.raises(peftkit.ConfigError, match="1 <= target_r <= init_r"):
        AdaLoRAConfig(init_r=4, target_r=6)


def test_rank_larger_than_the_layer_raises_at_apply():
    model = MODELS["mlp"]()
    with pytest.raises(peftkit.ConfigError, match="init_r=20 exceeds min.* = 16 of fc1"):
        peftkit.apply(model, AdaLoRAConfig(init_r=20, target_r=2, targets=["fc1"]))
    assert not peftkit.has_adapter(model)


def test_saved_after_masking_loads_the_same_model(tmp_path):
    model = _mlp_adalora(tfinal=2)
    schedule = _train_plain(model, steps=8, total=8)
    peftkit.save(model, tmp_path)
    back = peftkit.load(MODELS["mlp"](), tmp_path)
    x = example_inputs("mlp")
    torch.testing.assert_close(output_of(back, x), output_of(model, x), atol=0, rtol=0)
    assert {n: int(back.get_submodule(n).rank_mask.sum()) for n in ("fc1", "fc2")} == schedule.kept_ranks()
    assert sum(schedule.kept_ranks().values()) == 4


def test_masking_without_an_optimizer_happens_at_once():
    model = _mlp_adalora()
    schedule = peftkit.schedule_for(model, total_steps=4)
    with torch.no_grad():
        for layer in schedule.layers.values():
            layer.lora_E.fill_(1.0)
    output_of(model, {"x": torch.randn(2, 16)}).sum().backward()
    schedule.step(4, None)  # the final step: budget 4 of 8
    assert sum(int((layer.lora_E != 0).sum()) for layer in schedule.layers.values()) == 4


# --- Hugging Face peft interop (peft_type "ADALORA"), both directions --------------------------
def _llama_inputs():
    return example_inputs("llama")


def _perturb(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _logits_close(a, b, inputs):
    assert (output_of(a, inputs) - output_of(b, inputs)).abs().max().item() < 1e-5


def _masked_llama(kind: str = "llama", targets=("q_proj", "v_proj")):
    """AdaLoRA trained through its whole schedule on a tiny model, so that triplets are masked."""
    model = peftkit.apply(MODELS[kind](), AdaLoRAConfig(init_r=4, target_r=2, targets=list(targets), tfinal=1))
    _perturb(model)
    schedule = peftkit.schedule_for(model, total_steps=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for step in range(1, 5):
        inputs = example_inputs(kind, seed=step)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        schedule.step(step, opt)
        opt.step()
        opt.zero_grad()
    assert sum(schedule.kept_ranks().values()) == 2 * len(schedule.layers)
    return model


@pytest.mark.parametrize("kind, targets, masked", [
    ("llama", ("q_proj", "v_proj"), False), ("llama", ("q_proj", "v_proj", "down_proj"), True),
    ("gpt2", ("c_attn",), False), ("gpt2", ("c_attn", "c_fc"), True)])
def test_peftkit_to_peft(kind, targets, masked, tmp_path):
    peft = pytest.importorskip("peft")
    if masked:
        model = _masked_llama(kind, targets)
    else:
        model = peftkit.apply(MODELS[kind](), AdaLoRAConfig(init_r=4, target_r=2, targets=list(targets)))
        _perturb(model)
    peftkit.save(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path).eval()
    _logits_close(model, theirs, example_inputs(kind))
    back = peftkit.load(MODELS[kind](), tmp_path)  # the export reads back in peftkit (resized when masked)
    _logits_close(model, back, example_inputs(kind))
    pattern = back.peftkit_state.config.rank_pattern
    assert (sum(map(sum, pattern.values())) == 2 * len(pattern)) if masked else pattern == {}


def _peft_adalora(peft, **kw):
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], **kw)
    return peft.get_peft_model(MODELS["llama"](), cfg)


def test_peft_to_peftkit_fresh(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = _peft_adalora(peft, total_step=10)
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load(MODELS["llama"](), tmp_path)
    _logits_close(ours, theirs.eval(), _llama_inputs())


def test_peft_to_peftkit_after_peft_masked_and_back_again(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = _peft_adalora(peft, total_step=4, tinit=1, tfinal=1)
    _perturb(theirs)
    opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.01)
    for step in range(1, 5):  # peft's documented order: backward, optimizer step, update_and_allocate
        inputs = example_inputs("llama", seed=step)
        theirs(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        theirs.base_model.update_and_allocate(step)
        opt.zero_grad()
    theirs.save_pretrained(tmp_path / "peft")
    pattern = theirs.peft_config["default"].rank_pattern
    assert pattern and not all(all(v) for v in pattern.values())  # peft resized the saved tensors
    ours = peftkit.load(MODELS["llama"](), tmp_path / "peft")
    _logits_close(ours, theirs.eval(), _llama_inputs())
    assert ours.model.layers[0].self_attn.q_proj.lora_E.shape[0] == sum(pattern["model.layers.0.self_attn.q_proj.lora_E"])
    peftkit.save(ours, tmp_path / "peftkit")  # and on: peftkit's own format, then peft's again
    again = peftkit.load(MODELS["llama"](), tmp_path / "peftkit")
    peftkit.save(again, tmp_path / "peft2", format="peft")
    _logits_close(peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "peft2").eval(), theirs,
                  _llama_inputs())


# --- peftkit's training loop: the schedule runs by itself and resumes exactly -------------------
def _adalora_classifier():
    from train_toy import base_classifier

    cfg = AdaLoRAConfig(init_r=4, target_r=2, targets=["fc1", "fc2"], modules_to_save=["head"], tinit=2, tfinal=3,
                        orth_reg_weight=0.1)
    return peftkit.apply(base_classifier(), cfg)


class _Snapshot:
    """Records a schedule's state at the start of one step's on_after_backward."""

    def __init__(self, schedule, step: int) -> None:
        self.schedule, self.step, self.state = schedule, step, None

    def on_after_backward(self, step, model, optimizer) -> None:
        if step == self.step:
            self.state = {k: v.clone() for k, v in self.schedule.state_dict().items()}


def test_the_loop_runs_the_schedule_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    from peftkit.core.io import adapter_state_dict
    from peftkit.train.loop import train

    from train_toy import stack, toy_config, toy_data

    cfg = dict(max_steps=12, save_every=4, keep_checkpoints=3, eval_every=0, grad_accum=2)
    clean = _adalora_classifier()
    train(clean, toy_data(64), None, toy_config(tmp_path / "clean", **cfg), stack)  # adds the schedule itself
    assert sum(int(clean.get_submodule(n).rank_mask.sum()) for n in ("fc1", "fc2")) == 4
    checkpoint = tmp_path / "clean" / "checkpoint-000004"  # mid-budget: masks and EMAs matter
    assert (checkpoint / "schedule.safetensors").is_file()

    resumed = _adalora_classifier()
    schedule = peftkit.schedule_for(resumed, 12)  # passed in: the loop uses it instead of making one
    loaded = _Snapshot(schedule, 5)
    train(resumed, toy_data(64), None, toy_config(tmp_path / "resumed", **cfg), stack, resume=checkpoint,
          callbacks=[loaded, schedule])
    for key, value in adapter_state_dict(clean).items():
        torch.testing.assert_close(adapter_state_dict(resumed)[key], value, rtol=0, atol=1e-6, msg=key)

    # the EMAs the resumed run started from are the ones the clean run had after step 4
    again = _adalora_classifier()
    schedule = peftkit.schedule_for(again, 12)
    saved = _Snapshot(schedule, 4)
    train(again, toy_data(64), None, toy_config(tmp_path / "again", **cfg), stack, callbacks=[schedule, saved])
    assert saved.state.keys() == loaded.state.keys() and len(saved.state) == 12
    for key, value in saved.state.items():
        torch.testing.assert_close(loaded.state[key], value, rtol=0, atol=0, msg=key)
