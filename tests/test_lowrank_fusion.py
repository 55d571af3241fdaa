"""Sibling LoRA layers sharing one down projection (`peftkit.methods.shared_lowrank`).

Every check compares the adapted model with a hand-written reference: a copy of the model in which each
LoRA layer is `HandLoRA` (base(x) + s F.linear(F.linear(x, A), B), plain autograd), in float64. Which
path ran is read from the autograd graph (`SharedDownBackward` nodes: one per fused group and input).
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.core.layer import adapter_layers
from peftkit.methods import shared_lowrank
from peftkit.methods.lora import LoRALinear

from tiny_models import tiny_llama

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class HandLoRA(nn.Module):
    """The reference: y = W x + b + s B A x with plain autograd ops."""

    def __init__(self, layer: LoRALinear) -> None:
        super().__init__()
        self.base, self.s = layer.base, layer.scaling
        self.A = nn.Parameter(layer.lora_A.detach().clone())
        self.B = nn.Parameter(layer.lora_B.detach().clone())

    def forward(self, x):
        return self.base(x) + self.s * F.linear(F.linear(x, self.A), self.B)


def reference_of(model: nn.Module) -> tuple[nn.Module, dict[str, HandLoRA]]:
    """A deep copy of `model` with every LoRA layer replaced by HandLoRA holding the same values."""
    ref = copy.deepcopy(model)
    hands = {}
    for name, layer in adapter_layers(ref).items():
        parent, _, child = name.rpartition(".")
        hands[name] = HandLoRA(layer)
        setattr(ref.get_submodule(parent), child, hands[name])
    return ref, hands


def perturbed_lora(model: nn.Module, targets=ALL_LINEAR, r: int = 4, dropout: float = 0.0, **patterns) -> nn.Module:
    model = model.double().train()
    peftkit.apply(model, peftkit.LoRAConfig(targets=targets, r=r, alpha=8, dropout=dropout, **patterns))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    return model


def graph_names(t: torch.Tensor) -> list[str]:
    """Names of all autograd nodes behind `t`."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def step(model: nn.Module, run, weights: torch.Tensor | None = None):
    """Output, loss graph node names and gradients of one forward + backward; gradients are cleared."""
    out = run()
    names = graph_names(out)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape) if weights is None else weights
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), names, grads


def assert_matches_reference(model, ref, hands, run_model, run_ref) -> list[str]:
    """model == reference in output and every LoRA gradient (float64); the model's graph node names."""
    out, names, grads = step(model, run_model)
    ref_out, _, ref_grads = step(ref, run_ref)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    assert {n for n in grads if "lora_" in n} == {n.replace(".A", ".lora_A").replace(".B", ".lora_B")
                                                  for n in ref_grads if n.endswith((".A", ".B"))}
    for name in (n for n in hands if f"{n}.A" in ref_grads):
        torch.testing.assert_close(grads[f"{name}.lora_A"], ref_grads[f"{name}.A"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grads[f"{name}.lora_B"], ref_grads[f"{name}.B"], rtol=1e-9, atol=1e-12)
    return names


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def llama_case():
    model = perturbed_lora(tiny_llama())
    ref, hands = reference_of(model)
    return model, ref, hands, (lambda: model(input_ids=IDS).logits), (lambda: ref(input_ids=IDS).logits)


# --- equality with the reference, and that fusion happens ----------------------------------
def test_llama_fuses_qkv_and_gate_up_after_the_first_backward():
    model, ref, hands, run, run_ref = llama_case()
    first = assert_matches_reference(model, ref, hands, run, run_ref)
    assert "SharedDownBackward" not in first  # the first forward finds the groups
    groups = {id(m.siblings): [n.rsplit(".", 1)[1] for n, k in adapter_layers(model).items() if k.siblings is m.siblings]
              for m in adapter_layers(model).values() if m.siblings is not None}
    assert sorted(map(tuple, groups.values())) == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    for _ in range(2):
        names = assert_matches_reference(model, ref, hands, run, run_ref)
        assert names.count("SharedDownBackward") == 4  # (q, k, v) and (gate, up) in both layers
        assert names.count("SiblingUpBackward") == 10 and names.count("LowRankAddBackward") == 4  # o, down


def test_siblings_with_their_own_ranks_and_scalings():
    model = perturbed_lora(tiny_llama(), rank_pattern={"k_proj": 2, "up_proj": 6}, alpha_pattern={"v_proj": 3.0})
    ref, hands = reference_of(model)
    for i in range(2):
        names = assert_matches_reference(model, ref, hands, lambda: model(input_ids=IDS).logits,
                                         lambda: ref(input_ids=IDS).logits)
        assert names.count("SharedDownBackward") == 4 * i


def test_unfused_switch_and_no_grad_do_not_fuse():
    model, ref, hands, run, run_ref = llama_case()
    for _ in range(2):
        assert_matches_reference(model, ref, hands, run, run_ref)
    with shared_lowrank.unfused():
        assert "SharedDownBackward" not in assert_matches_reference(model, ref, hands, run, run_ref)
    with torch.no_grad():
        torch.testing.assert_close(run(), run_ref(), rtol=1e-10, atol=1e-12)


class CrossInputs(nn.Module):
    """q reads x; k and v read z (cross-attention's pattern); w reads another tensor of equal values."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v, self.w = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, z):
        return self.q(x) * self.k(z) + self.v(z) * self.w(x.clone())


def test_only_layers_reading_the_same_tensor_are_grouped():
    torch.manual_seed(0)
    model = perturbed_lora(CrossInputs(), targets=["q", "k", "v", "w"])
    ref, hands = reference_of(model)
    x, z = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    for i in range(3):
        names = assert_matches_reference(model, ref, hands, lambda: model(x, z), lambda: ref(x, z))
        assert names.count("SharedDownBackward") == (1 if i else 0)
    assert model.k.siblings is model.v.siblings and model.k.siblings.members == [model.k, model.v]
    assert model.q.siblings is None and model.w.siblings is None


def test_bert_cross_attention_groups_key_and_value():
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
                     max_position_embeddings=64, is_decoder=True, add_cross_attention=True, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # train mode without randomness
    model = perturbed_lora(BertLMHeadModel(cfg), targets=["query", "key", "value"])
    ref, hands = reference_of(model)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    enc = torch.randn(2, 4, 32, dtype=torch.float64)
    run = lambda: model(input_ids=ids, encoder_hidden_states=enc, use_cache=False).logits  # noqa: E731
    run_ref = lambda: ref(input_ids=ids, encoder_hidden_states=enc, use_cache=False).logits  # noqa: E731
    for _ in range(3):
        names = assert_matches_reference(model, ref, hands, run, run_ref)
    cross = model.bert.encoder.layer[0].crossattention.self
    assert cross.key.siblings.members == [cross.key, cross.value] and cross.query.siblings is None
    assert names.count("SharedDownBackward") == 4  # self-attention q, k, v and cross k, v, in 2 layers


# --- checks on every call: fallbacks ---------------------------------------------------------
class ChangesBetween(nn.Module):
    """q, k, v on one tensor; `between` runs after q (an in-place change of the input, or of k's A)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.between = None
        self.skip_v = False

    def forward(self, x):
        h = x * 1.0  # an intermediate, so it may be changed in place
        q = self.q(h)
        if self.between is not None:
            self.between(self, h)
        return q + self.k(h) * (0 if self.skip_v else self.v(h))


def _changes_case():
    torch.manual_seed(0)
    model = perturbed_lora(ChangesBetween(), targets=["q", "k", "v"])
    x = torch.randn(4, 8, dtype=torch.float64)
    for _ in range(2):
        step(model, lambda: model(x))
    return model, x


def test_input_changed_in_place_after_the_first_sibling_is_projected_again():
    model, x = _changes_case()
    model.between = lambda m, h: h.mul_(2.0)
    ref, _ = reference_of(model)
    out = model(x)  # forward only: backward through q would need h as it was (in any implementation)
    torch.testing.assert_close(out, ref(x), rtol=1e-10, atol=1e-12)
    assert graph_names(out).count("SharedDownBackward") == 2  # q's projection, then k's of the changed h


def test_factor_changed_after_the_projection_is_not_used():
    model, x = _changes_case()
    ref, hands = reference_of(model)

    def bump(_, __):  # changes k's A after q projected it (and the reference's A alike)
        with torch.no_grad():
            for a in (model.k.lora_A, hands["k"].A):
                a.add_(0.5)
    model.between = bump
    names = assert_matches_reference(model, ref, hands, lambda: model(x), lambda: ref(x))
    assert names.count("SharedDownBackward") == 2


def test_sibling_not_called_gives_correct_gradients_and_frees_everything():
    model, x = _changes_case()
    model.skip_v = True
    ref, hands = reference_of(model)
    assert_matches_reference(model, ref, hands, lambda: model(x), lambda: ref(x))
    _assert_nothing_retained(model, lambda: model(x), backward=True)
    _assert_nothing_retained(model, lambda: model(x), backward=False)


# --- nothing retained --------------------------------------------------------------------------
def _assert_nothing_retained(model: nn.Module, run, backward: bool) -> None:
    inputs = []
    handles = [layer.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
               for layer in adapter_layers(model).values()]
    out = run()
    if backward:
        out.sum().backward()
        model.zero_grad(set_to_none=True)
    del out
    gc.collect()
    for h in handles:
        h.remove()
    assert inputs and all(ref() is None for ref in inputs)
    groups = {id(g): g for layer in adapter_layers(model).values() if (g := layer.siblings) is not None}
    assert all(g._pending is None or g._pending() is None for g in groups.values())


@pytest.mark.parametrize("backward", [True, False])
def test_no_tensor_outlives_forward_and_backward(backward):
    model, *_ = llama_case()
    for _ in range(2):
        step(model, lambda: model(input_ids=IDS).logits)
    _assert_nothing_retained(model, lambda: model(input_ids=IDS).logits, backward)


# --- life cycle: merge, disable, dropout, copies, checkpointing --------------------------------
def test_merge_unmerge_and_disable_after_fusing():
    model, ref, hands, run, run_ref = llama_case()
    for _ in range(2):
        assert_matches_reference(model, ref, hands, run, run_ref)
    peftkit.merge(model)  # merging computes in float32
    torch.testing.assert_close(run(), run_ref(), rtol=1e-5, atol=1e-6)
    peftkit.unmerge(model)
    ref, hands = reference_of(model)  # unmerging restores the base to float32 rounding
    run_ref = lambda: ref(input_ids=IDS).logits  # noqa: E731
    assert assert_matches_reference(model, ref, hands, run, run_ref).count("SharedDownBackward") == 4
    with peftkit.disabled(model):
        base = run()
    with torch.no_grad():
        for hand in hands.values():
            hand.B.zero_()
    torch.testing.assert_close(base, run_ref(), rtol=1e-10, atol=1e-12)


def test_active_dropout_is_never_fused():
    model = perturbed_lora(tiny_llama(), dropout=0.1)
    for _ in range(3):
        assert "SharedDownBackward" not in step(model, lambda: model(input_ids=IDS).logits)[1]
    model.eval()  # dropout off: the siblings fuse (with grad)
    for i in range(2):
        assert ("SharedDownBackward" in step(model, lambda: model(input_ids=IDS).logits)[1]) == (i == 1)


def test_copies_fuse_their_own_layers():
    model, *_ = llama_case()
    for _ in range(2):
        step(model, lambda: model(input_ids=IDS).logits)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layer = twin.model.layers[0].self_attn.q_proj
        assert layer.siblings.members[0] is layer and layer.siblings.active
        with torch.no_grad():
            twin.model.layers[0].self_attn.k_proj.lora_B.mul_(3.0)
        ref, hands = reference_of(twin)
        run = lambda t=twin: t(input_ids=IDS).logits  # noqa: E731
        names = assert_matches_reference(twin, ref, hands, run, lambda r=ref: r(input_ids=IDS).logits)
        assert names.count("SharedDownBackward") == 4


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    model, ref, hands, run, run_ref = llama_case()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
        ref.enable_input_require_grads()
    for _ in range(3):  # discovery, activation during a backward that replays the blocks, fused
        assert_matches_reference(model, ref, hands, run, run_ref)
    assert model.model.layers[0].self_attn.q_proj.siblings.active
