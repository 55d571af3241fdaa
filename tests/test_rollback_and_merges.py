"""Issue 13, the core life cycle: a failed apply / load / merge leaves the model exactly as it was; tied
weights are never merged into the module they are tied to; modules_to_save must match; DoRA on an
all-zero base row stays finite.

"Exactly" is checked literally: the same module object at every name, the same tensor objects with
torch.equal values, the same requires_grad flags, the same hooks and attributes on every module.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import pytest
import torch
import torch.nn as nn

import peftkit
import peftkit.core.apply as apply_module
from peftkit.core import weights
from peftkit.core.apply import get_state
from peftkit.core.model_adapter import ModelAdapter

from test_contract import ROWS
from tiny_models import MODELS, example_inputs, output_of, tiny_gemma2, tiny_gpt2, tiny_llama

# --- what "exactly as before" means -----------------------------------------------------------------------------


def model_state(model: nn.Module) -> dict:
    named = dict(model.named_modules(remove_duplicate=False))
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return {
        "modules": named,
        "tensors": {n: (t, t.detach().clone()) for n, t in tensors},
        "flags": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "attrs": {n: {k: (len(v) if isinstance(v, dict | set) else id(v)) for k, v in m.__dict__.items()}
                  for n, m in named.items()},
    }


def assert_same(model: nn.Module, before: dict) -> None:
    now = model_state(model)
    assert now["modules"].keys() == before["modules"].keys()
    assert all(now["modules"][n] is m for n, m in before["modules"].items()), "a module object was replaced"
    assert now["tensors"].keys() == before["tensors"].keys()
    for name, (tensor, value) in before["tensors"].items():
        assert now["tensors"][name][0] is tensor, f"{name} is another tensor object"
        assert tensor.dtype == value.dtype and torch.equal(tensor, value), f"{name} changed"
    assert now["flags"] == before["flags"]
    assert now["attrs"] == before["attrs"], "an attribute, hook or slot was left behind"
    assert not peftkit.has_adapter(model)


def faulty_layers(monkeypatch, hook: str, fail_at: int, error: BaseException) -> None:
    """Make the `fail_at`-th call of `hook` on any adapter layer raise `error` AFTER doing its work; `attach`
    is the hook of the adapter's whole-model part (`ModelAdapter.attach`, run once after all its layers)."""
    real_get_method = apply_module.get_method
    calls = [0]

    def get_method(cfg):
        method = real_get_method(cfg)
        if hook == "attach":
            make = method.model_adapter or ModelAdapter

            def made(cfg):
                part = make(cfg)
                real = part.attach

                def fail(*args, **kwargs):
                    real(*args, **kwargs)
                    raise error

                part.attach = fail
                return part

            return dataclasses.replace(method, model_adapter=made)
        if method.build is None:
            return method

        def build(module, cfg, name):
            layer = method.build(module, cfg, name)
            if layer is not None:
                real = getattr(layer, hook)

                def fail(*args, **kwargs):
                    real(*args, **kwargs)
                    calls[0] += 1
                    if calls[0] == fail_at:
                        raise error

                layer.__dict__[hook] = fail
            return layer

        return dataclasses.replace(method, build=build)

    monkeypatch.setattr(apply_module, "get_method", get_method)


def _one_row_per_method():
    seen, rows = {"spt"}, []  # SPT's planning pass costs seconds and its layers are LoRA's and a sparse delta
    for row in ROWS:
        key = row.id if row.id in ("lora-pissa", "lora-olora") else row.config().method
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


ONE_PER_METHOD = _one_row_per_method()
_LAYER_COUNTS: dict[int, int] = {}


def _layer_count(row) -> int:
    if id(row) not in _LAYER_COUNTS:
        _LAYER_COUNTS[id(row)] = len(get_state(peftkit.apply(MODELS[row.model](0), row.config())).adapted)
    return _LAYER_COUNTS[id(row)]


# --- 1. a failed apply or load ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hook", ["reset_parameters", "attach"])
@pytest.mark.parametrize("row", ONE_PER_METHOD, ids=lambda r: r.id or r.config().method)
def test_a_fault_in_the_last_layer_rolls_apply_back_exactly(row, hook, monkeypatch):
    count = _layer_count(row)
    if count == 0:
        pytest.skip("a selection method adds no layers")
    model = MODELS[row.model](0)
    before = model_state(model)
    faulty_layers(monkeypatch, hook, count, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        peftkit.apply(model, row.config())
    assert_same(model, before)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), MemoryError(), peftkit.ConfigError("bad field")])
@pytest.mark.parametrize("init", ["pissa", "olora", "kaiming"])
def test_any_exception_in_an_init_rolls_back_the_base_weights_it_rewrote(init, error, monkeypatch):
    model = tiny_llama()
    before = model_state(model)
    faulty_layers(monkeypatch, "reset_parameters", 3, error)  # after two layers' residuals were written
    with pytest.raises(type(error)):
        peftkit.apply(model, peftkit.LoRAConfig(r=4, init=init, targets=["q_proj", "v_proj"]))
    assert_same(model, before)


def test_a_rank_that_fits_one_module_but_not_the_next_rolls_back():
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(Exception):  # noqa: B017  (whatever refuses the absurd rank, the model must not change)
        peftkit.apply(model, peftkit.LoRAConfig(r=4, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2**40}))
    assert_same(model, before)


def test_a_failed_load_of_a_base_rewriting_adapter_rolls_back_exactly(tmp_path, monkeypatch):
    trained = peftkit.apply(tiny_llama(), peftkit.LoRAConfig(r=4, init="pissa", targets=["q_proj", "v_proj"]))
    peftkit.save(trained, tmp_path)
    model = tiny_llama()
    before = model_state(model)
    faulty_layers(monkeypatch, "after_load", 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        peftkit.load(model, tmp_path)
    assert_same(model, before)
    monkeypatch.undo()
    peftkit.load(model, tmp_path)  # and the model still takes the adapter afterwards


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_a_failed_replace_puts_the_previous_adapter_back(init, monkeypatch):
    model = peftkit.apply(tiny_llama(), peftkit.LoRAConfig(r=4, init=init, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        get_state(model)  # the old adapter, trained a little
        for layer in apply_module.adapter_layers_of(model):
            layer.lora_B.add_(0.1)
    inputs = example_inputs("llama")
    with torch.no_grad():
        expected = output_of(model, inputs)
    before = model_state(model)
    state = get_state(model)
    faulty_layers(monkeypatch, "attach", 1, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        peftkit.apply(model, peftkit.DoRAConfig(r=2, targets=["k_proj", "o_proj"]), replace=True)
    now = model_state(model)
    for name, (tensor, value) in before["tensors"].items():
        assert now["tensors"][name][0] is tensor and torch.equal(tensor, value), name
    assert now["modules"].keys() == before["modules"].keys() and get_state(model) is state
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), expected)


# --- 3. modules_to_save must match ------------------------------------------------------------------------------
def test_modules_to_save_that_matches_nothing_is_refused_with_the_candidates():
    model = MODELS["bert"](0)
    before = model_state(model)
    with pytest.raises(peftkit.ConfigError, match=r"\['clasifier'\].*classifier"):
        peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["query"], modules_to_save=["clasifier"]))
    assert_same(model, before)
    with pytest.raises(peftkit.ConfigError, match="dropout"):  # matches modules, but none holds a parameter
        peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["query"], modules_to_save=["classifier", "dropout"]))
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["query"], modules_to_save=["classifier"]))
    assert get_state(model).selected == ["classifier.bias", "classifier.weight"]


# --- 4. exact rollback of merges --------------------------------------------------------------------------------
def _trained_lora(dtype: torch.dtype, **cfg):
    model = peftkit.apply(tiny_llama().to(dtype), peftkit.LoRAConfig(r=4, **cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in apply_module.adapter_layers_of(model):
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
    return model


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}


def _assert_bases_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = _base_tensors(model)
    assert now.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(now[name], value), f"{name}: {(now[name] != value).sum()} elements differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merge_failing_on_a_non_finite_layer_restores_every_bit(dtype):
    model = _trained_lora(dtype)
    before = _base_tensors(model)
    with torch.no_grad():
        apply_module.adapter_layers_of(model)[5].lora_B[0, 0] = float("inf")
    with pytest.raises(peftkit.MergeError, match="non-finite"):
        peftkit.merge(model)
    _assert_bases_equal(model, before)
    assert not any(layer.merged for layer in apply_module.adapter_layers_of(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merge_interrupted_midway_restores_every_bit(dtype, monkeypatch):
    model = _trained_lora(dtype)
    before = _base_tensors(model)
    real, calls = weights.set_weight, [0]

    def set_weight(module, weight):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        real(module, weight)

    monkeypatch.setattr(weights, "set_weight", set_weight)
    with pytest.raises(KeyboardInterrupt):
        peftkit.merge(model)
    _assert_bases_equal(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_keep_base_makes_unmerge_and_unload_bit_exact(dtype):
    model = _trained_lora(dtype, targets="all-linear")
    before = _base_tensors(model)
    for _ in range(3):
        peftkit.merge(model, keep_base=True)
        peftkit.unmerge(model)
    _assert_bases_equal(model, before)
    peftkit.unload(model)
    assert {n: v for n, v in model.state_dict().items()}.keys() == before.keys()
    _assert_bases_equal(model, before)


def test_a_merge_without_keep_base_keeps_no_copy_and_unmerges_within_rounding():
    model = _trained_lora(torch.float32, targets="all-linear")
    before = _base_tensors(model)
    peftkit.merge(model)
    assert all(layer._base_copy is None for layer in apply_module.adapter_layers_of(model))
    peftkit.unmerge(model)
    for name, value in before.items():  # one rounding of W + delta: a few ulps of the larger of the two
        torch.testing.assert_close(_base_tensors(model)[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_init_unload_is_within_the_documented_rounding(init, dtype):
    model = tiny_llama().to(dtype)
    before = _base_tensors(model)
    peftkit.unload(peftkit.apply(model, peftkit.LoRAConfig(r=4, init=init, targets=["q_proj", "v_proj", "gate_proj"])))
    ulp = torch.finfo(dtype).eps
    for name, value in before.items():
        now = _base_tensors(model)[name]
        if name.endswith(("q_proj.weight", "v_proj.weight", "gate_proj.weight")):
            # one unit in the last place of the rounded residual, whose size is that of W0 or s B0 A0
            assert ((now.float() - value.float()).abs() <= 2 * ulp * value.float().abs().max()).all(), name
        else:
            assert torch.equal(now, value), name


# --- 2. tied weights --------------------------------------------------------------------------------------------
def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _embeddings(model):
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    unwrap = lambda m: m.base if isinstance(m, peftkit.AdapterLayer) else m  # noqa: E731
    return unwrap(inputs), unwrap(outputs)


TIED = [
    ("llama-lora-input-embeddings", tied_llama, "llama", lambda: peftkit.LoRAConfig(r=4, targets="input-embeddings")),
    ("llama-lora-lm_head", tied_llama, "llama", lambda: peftkit.LoRAConfig(r=4, targets=["lm_head", "q_proj"])),
    ("llama-dora-lm_head", tied_llama, "llama", lambda: peftkit.DoRAConfig(r=4, targets=["lm_head"])),
    ("gpt2-lora-wte", tiny_gpt2, "gpt2", lambda: peftkit.LoRAConfig(r=4, targets=["wte", "c_attn"])),
    ("gpt2-lora-lm_head", tiny_gpt2, "gpt2", lambda: peftkit.LoRAConfig(r=4, targets=["lm_head"])),
    ("gpt2-both", tiny_gpt2, "gpt2", lambda: peftkit.LoRAConfig(r=4, targets=["lm_head", "wte"])),
    # Gemma scales its embeddings in forward: the unmerged update is scaled like the merged one
    ("gemma2-lora-input-embeddings", tiny_gemma2, "llama", lambda: peftkit.LoRAConfig(r=4, targets="input-embeddings")),
]


def _perturb(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(("build", "kind", "config"), [t[1:] for t in TIED], ids=[t[0] for t in TIED])
def test_merging_through_a_tied_weight_leaves_the_other_module_alone(build, kind, config, tmp_path):
    model = build()
    inputs = example_inputs(kind)
    shared = _embeddings(model)[0].weight
    assert _embeddings(model)[1].weight is shared  # the model is tied
    original = shared.detach().clone()
    peftkit.apply(model, config())
    _perturb(model)
    with torch.no_grad():
        adapted = output_of(model, inputs)
        with pytest.warns(UserWarning, match="tied weights"):
            peftkit.merge(model)
        torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=0)
        assert torch.equal(shared, original)  # the shared tensor itself is never written
        peftkit.unmerge(model)
        inp, out = _embeddings(model)
        assert inp.weight is shared and out.weight is shared and torch.equal(shared, original)  # tied again, exact
        torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain = peftkit.unload(peftkit.merge(model))
        assert any("tie_word_embeddings=False" in str(w.message) for w in caught)
        torch.testing.assert_close(output_of(plain, inputs), adapted, atol=1e-5, rtol=0)
    assert plain.config.tie_word_embeddings is False
    plain.save_pretrained(tmp_path)  # what `peftkit merge` writes: reloads as the merged model, not re-tied
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(reloaded, inputs), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_base_rewriting_init_on_a_tied_head_does_not_touch_the_embeddings(init):
    model = tied_llama()
    inputs = example_inputs("llama")
    shared = model.lm_head.weight
    original = shared.detach().clone()
    with torch.no_grad():
        base_out = output_of(model, inputs)
    with pytest.warns(UserWarning, match="tied weights"):
        peftkit.apply(model, peftkit.LoRAConfig(r=4, init=init, targets=["lm_head"]))
    assert model.model.embed_tokens.weight is shared and torch.equal(shared, original)
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, inputs), base_out, atol=2e-5, rtol=0)
    peftkit.unload(model)
    assert model.lm_head.weight is shared and torch.equal(shared, original)  # re-tied, bit for bit


def test_untied_models_merge_without_a_warning(recwarn):
    model = peftkit.apply(tiny_llama(), peftkit.LoRAConfig(r=4, targets=["embed_tokens", "lm_head"]))
    peftkit.merge(model)
    assert not [w for w in recwarn if "tied" in str(w.message)]


# --- 5. DoRA on a base row of zeros -----------------------------------------------------------------------------
def _zero_row_model(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=bias))
    with torch.no_grad():
        model[0].weight[2] = 0
    return model


@pytest.mark.parametrize("bias", [False, True], ids=["folded-kernel", "scale-rows-kernel"])
@pytest.mark.parametrize("trained", [False, True])
def test_dora_on_an_all_zero_row_is_finite_and_merges(bias, trained):
    model = peftkit.apply(_zero_row_model(bias), peftkit.DoRAConfig(r=2, targets=["0"]))
    layer = model[0]
    if trained:
        with torch.no_grad():
            layer.lora_B.normal_()
            layer.lora_B[2] = 0  # the row's norm stays 0 while its magnitude moves
            layer.magnitude.add_(0.5)
    x = torch.randn(16, 8)  # tokens >= d_in: the folded kernel runs where the base has no bias
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in (layer.lora_A, layer.lora_B, layer.magnitude))
    assert layer.lora_B.grad[2].abs().sum() > 0 or not trained  # the zero row can still learn its way out
    with torch.no_grad():
        unmerged = model(x)
        peftkit.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)
        peftkit.unmerge(model)
        assert torch.isfinite(layer.base.weight).all() and (layer.base.weight[2] == 0).all()
        torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)


def test_dora_with_a_zero_magnitude_unmerges_exactly():
    model = peftkit.apply(_zero_row_model(True), peftkit.DoRAConfig(r=2, targets=["0"]))
    base = model[0].base.weight.detach().clone()
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[0].magnitude[1] = 0  # row 1 merges to zeros: W0's row cannot be divided back
        peftkit.merge(model)
        peftkit.unmerge(model)
    assert torch.equal(model[0].base.weight, base)


def test_dora_zero_row_equals_peft_where_peft_is_finite():
    peft = pytest.importorskip("peft")
    ours = peftkit.apply(_zero_row_model(True), peftkit.DoRAConfig(r=2, alpha=4, targets=["0"]))
    theirs = peft.get_peft_model(_zero_row_model(True), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                                        use_dora=True))
    x = torch.randn(16, 8)
    for trained in (False, True):
        if trained:
            with torch.no_grad():
                ours[0].lora_B.normal_()
        layer = theirs.base_model.model[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(ours[0].lora_A)
            layer.lora_B["default"].weight.copy_(ours[0].lora_B)
            layer.lora_magnitude_vector["default"].weight.copy_(ours[0].magnitude)
            mine, reference = ours(x), theirs(x)
        finite = torch.isfinite(reference)
        assert torch.isfinite(mine).all() and finite.any()
        assert trained or not finite.all()  # peft: 0 / 0 on the zero row at init
        torch.testing.assert_close(mine[finite], reference[finite], atol=1e-5, rtol=1e-5)


def test_lora_on_a_scaled_embedding_equals_peft():
    peft = pytest.importorskip("peft")
    inputs = example_inputs("llama")
    ours = peftkit.apply(tiny_gemma2(), peftkit.LoRAConfig(r=4, alpha=8, targets=["embed_tokens"]))
    theirs = peft.get_peft_model(tiny_gemma2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    _perturb(ours)
    layer = theirs.base_model.model.model.embed_tokens
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(ours.model.embed_tokens.lora_A)
        layer.lora_embedding_B["default"].copy_(ours.model.embed_tokens.lora_B)
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-5, rtol=0)
