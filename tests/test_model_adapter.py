"""Issue 14 section 4: the whole-model part of an adapter (`core.model_adapter.ModelAdapter`).

A method that needs the model (hooks on the root, tensors its layers share, its own learning rates) registers
a ModelAdapter next to its builder; `apply` attaches one per named adapter, once, after all its layers, and
`unload`/`delete`/a failed `apply` detach it. Checked here with a toy method and with the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core import registry
from peftkit.core.apply import get_state
from peftkit.core.config import AdapterConfig
from peftkit.core.model_adapter import ModelAdapter
from peftkit.core.params import param_groups

from tiny_models import example_inputs, mlp, output_of, tiny_llama

CALLS: list[tuple[str, int]] = []


@dataclass
class _ShiftConfig(AdapterConfig):
    method = "test-root-shift"
    shift: float = 1.0


class _Tap(peftkit.AdapterLayer):
    def __init__(self, base):
        super().__init__(base)
        self.g = nn.Parameter(torch.zeros(()))

    def adapt(self, x, y):
        return y + self.g


class _RootShift(ModelAdapter):
    """Adds `shift` to the model's output through a hook on the root; its layers' g train at 10x the lr."""

    def attach(self, model, layers):
        super().attach(model, layers)
        CALLS.append(("attach", len(layers)))
        self.hook(model.register_forward_hook(lambda module, args, out: out + self.cfg.shift))

    def detach(self, model):
        CALLS.append(("detach", len(self.layers)))
        super().detach(model)

    def learning_rates(self, base_lr):
        return {layer.g: 10 * base_lr for layer in self.layers.values()}


@pytest.fixture
def toy_method():
    registry.register(_ShiftConfig)(lambda module, cfg, name: _Tap(module) if isinstance(module, nn.Linear) else None)
    registry.register_model_adapter(_ShiftConfig)(_RootShift)
    CALLS.clear()
    try:
        yield
    finally:
        registry._METHODS.pop("test-root-shift")


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_attached_once_per_adapter_with_all_its_layers_and_detached_on_unload(toy_method):
    model, inputs = mlp(), example_inputs("mlp")
    base, hooks = output_of(model, inputs), _hooks(model)
    peftkit.apply(model, _ShiftConfig(targets=["fc1", "fc2"]))
    assert CALLS == [("attach", 2)] and isinstance(get_state(model).model_adapter, _RootShift)
    torch.testing.assert_close(output_of(model, inputs), base + 1.0)
    peftkit.unload(model)
    assert CALLS[-1] == ("detach", 2) and _hooks(model) == hooks
    torch.testing.assert_close(output_of(model, inputs), base, atol=0, rtol=0)


def test_each_named_adapter_has_its_own_part_and_delete_detaches_only_its_own(toy_method):
    model, inputs = mlp(), example_inputs("mlp")
    base = output_of(model, inputs)
    peftkit.apply(model, _ShiftConfig(targets=["fc1"], shift=1.0), name="a")
    peftkit.apply(model, _ShiftConfig(targets=["fc2"], shift=2.0), name="b")
    assert CALLS == [("attach", 1), ("attach", 1)]
    assert get_state(model, "a").model_adapter is not get_state(model, "b").model_adapter
    peftkit.delete(model, "b")
    assert CALLS[-1] == ("detach", 1)
    torch.testing.assert_close(output_of(model, inputs), base + 1.0)  # a's hook stays, b's went


def test_a_failing_attach_rolls_apply_back_and_removes_what_it_installed(toy_method, monkeypatch):
    model = mlp()
    hooks, modules = _hooks(model), dict(model.named_modules())
    real = _RootShift.attach

    def attach_then_fail(self, model, layers):
        real(self, model, layers)  # the hook is in place when the failure comes
        raise RuntimeError("injected")

    monkeypatch.setattr(_RootShift, "attach", attach_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        peftkit.apply(model, _ShiftConfig(targets=["fc1", "fc2"]))
    assert _hooks(model) == hooks and dict(model.named_modules()) == modules and not peftkit.has_adapter(model)


def test_learning_rates_of_the_model_adapter_become_parameter_groups(toy_method):
    model = peftkit.apply(mlp(), _ShiftConfig(targets=["fc1", "fc2"]))
    groups = {g["lr"]: g["params"] for g in param_groups(model, lr=1e-3)}
    assert set(groups) == {1e-2} and len(groups[1e-2]) == 2  # only g trains here, at 10x


def test_methods_without_a_registered_part_get_the_plain_one():
    model = peftkit.apply(tiny_llama(), peftkit.LoRAConfig(r=2, targets=["q_proj"]))
    part = get_state(model).model_adapter
    assert type(part) is ModelAdapter and part.layers == get_state(model).layers


def test_randlora_adapters_draw_their_bases_once_each():
    """RandLoRA's bases are the adapter's, shared by all its layers, sized for the largest; another named
    adapter with another seed has its own."""
    model = tiny_llama()
    peftkit.apply(model, peftkit.RandLoRAConfig(r=2, targets=["q_proj", "down_proj"]), name="a")
    peftkit.apply(model, peftkit.RandLoRAConfig(r=2, targets=["q_proj"], seed=1), name="b")
    a, b = get_state(model, "a").layers.values(), get_state(model, "b").layers.values()
    assert len({id(layer.bases) for layer in a}) == 1 and len({id(layer.bases) for layer in b}) == 1
    assert next(iter(a)).bases is not next(iter(b)).bases


def test_whole_model_methods_leave_no_hook_after_unload():
    cases = [peftkit.PromptTuningConfig(num_virtual_tokens=2), peftkit.PrefixTuningConfig(num_virtual_tokens=2),
             peftkit.LlamaAdapterConfig(adapter_len=2, adapter_layers=1), peftkit.DePTConfig(num_virtual_tokens=2, r=2, max_length=8)]
    for cfg in cases:
        model = tiny_llama()
        hooks = _hooks(model)
        peftkit.apply(model, cfg)
        assert _hooks(model) > hooks, cfg.method
        peftkit.unload(model)
        assert _hooks(model) == hooks, cfg.method
