"""Adapter files users can trust, and errors that say what to do.

Every failing load must leave the model exactly as it was before the call.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from unchanged import assert_unchanged, snapshot

import peftkit
from peftkit.core.io import CONFIG_FILE, WEIGHTS_FILE, read_adapter

from tiny_models import example_inputs, mlp, tiny_llama


@pytest.fixture
def saved(tmp_path):
    """A LoRA adapter of the tiny llama with non-zero weights, saved to tmp_path."""
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    peftkit.save(model, tmp_path)
    return tmp_path


def _failing_load(directory, error, match, **kwargs):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        peftkit.load(model, directory, **kwargs)
    assert_unchanged(model, before)


def test_saved_files_are_safetensors_and_json(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    assert meta["config"]["method"] == "lora" and meta["peftkit_version"] == peftkit.__version__
    assert "model.layers.0.self_attn.q_proj" in meta["base_fingerprint"]
    stacked = load_file(saved / WEIGHTS_FILE)  # blocks stacked: one tensor per (module, parameter) pattern
    assert stacked["model.layers.*.self_attn.q_proj.lora_A"].shape == (2, 2, 32) and len(stacked) == 4
    _, _, tensors = read_adapter(saved)
    assert "model.layers.1.self_attn.q_proj.lora_A" in tensors and len(tensors) == 8


def test_stacking_round_trips_and_keeps_odd_shapes_apart():
    from peftkit.core.io import stack_blocks, unstack_blocks

    tensors = {"m.layers.0.q.lora_A": torch.randn(2, 4), "m.layers.1.q.lora_A": torch.randn(2, 4),
               "m.layers.0.k.lora_A": torch.randn(2, 4), "m.layers.1.k.lora_A": torch.randn(3, 4), "head.w": torch.ones(2)}
    packed, index = stack_blocks(dict(tensors))
    assert set(packed) == {"m.layers.*.q.lora_A", "m.layers.0.k.lora_A", "m.layers.1.k.lora_A", "head.w"}
    assert index == {"m.layers.*.q.lora_A": [0, 1]}
    back = unstack_blocks(packed, index)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())


def _rewrite(saved, edit) -> None:
    """Edit the saved tensors (unstacked) and write them back as a plain, unstacked safetensors file,
    recording its digest in the JSON (a consistent pair, so the checks after the digest's are tested)."""
    from peftkit.core.files import sha256_file

    _, _, tensors = read_adapter(saved)
    edit(tensors)
    save_file(tensors, saved / WEIGHTS_FILE)
    meta = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps({**meta, "weights_sha256": sha256_file(saved / WEIGHTS_FILE)}))


def test_truncated_file(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    _failing_load(saved, peftkit.AdapterFileError, "truncated or corrupt")


def test_corrupt_json(saved):
    (saved / CONFIG_FILE).write_text("{not json")
    _failing_load(saved, peftkit.AdapterFileError, "not valid JSON")


def test_unknown_config_field(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    meta["config"]["rnak"] = 4
    (saved / CONFIG_FILE).write_text(json.dumps(meta))
    _failing_load(saved, peftkit.ConfigError, r"unknown LoRAConfig field\(s\) \['rnak'\]; valid fields: .*\br\b")


def test_missing_key(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.1.self_attn.v_proj.lora_B"))
    _failing_load(saved, peftkit.AdapterFileError, "missing model.layers.1.self_attn.v_proj.lora_B")


def test_shape_mismatch(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(3, 32)}))
    _failing_load(saved, peftkit.AdapterFileError, r"q_proj.lora_A: file \(3, 32\) vs model \(2, 32\)")


def test_missing_directory(tmp_path):
    _failing_load(tmp_path / "nope", peftkit.AdapterFileError, "holds no peftkit_adapter.json")


def test_different_base_is_refused_and_flag_allows_it(saved):
    other = tiny_llama(seed=1)
    before = snapshot(other)
    with pytest.raises(peftkit.AdapterFileError, match="different base model.*q_proj \\(weights differ\\)"):
        peftkit.load(other, saved)
    assert_unchanged(other, before)
    peftkit.load(other, saved, allow_different_base=True)
    assert peftkit.has_adapter(other)


def test_different_shapes_are_refused_even_with_the_flag(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=100))
    before = snapshot(wider)
    with pytest.raises(peftkit.AdapterFileError, match="shape"):
        peftkit.load(wider, saved, allow_different_base=True)
    assert_unchanged(wider, before)


def test_load_onto_adapted_model_is_refused(saved):
    model = peftkit.load(tiny_llama(), saved)
    with pytest.raises(peftkit.ConfigError, match="already has a peftkit adapter"):
        peftkit.load(model, saved)


def test_load_reproduces_outputs_and_is_not_pickle(saved):
    model = peftkit.load(tiny_llama(), saved)
    inputs = example_inputs("llama")
    reference = tiny_llama()
    peftkit.apply(reference, peftkit.LoRAConfig(r=2, targets=["q_proj", "v_proj"]), init=False)
    peftkit.load_weights(reference, saved)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits)
    assert (saved / WEIGHTS_FILE).read_bytes()[:8] != b"\x80\x02\x8a\nl\xfc\x9c"  # not a pickle


# --- bad configurations and targets ------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: peftkit.LoRAConfig(r=0), "positive integer"),
    (lambda: peftkit.LoRAConfig(dropout=1.5), "dropout"),
    (lambda: peftkit.LoRAConfig(init="svd"), "choose one of kaiming, gaussian, pissa, olora"),
    (lambda: peftkit.LoRAConfig(layers=[-1]), "non-negative"),
    (lambda: peftkit.PromptTuningConfig(num_virtual_tokens=-2), "non-negative"),
    (lambda: peftkit.PromptTuningConfig(init="text"), "needs init_text and tokenizer"),
    (lambda: peftkit.IA3Config(targets=None), "needs targets"),
    (lambda: peftkit.config_from_dict({"method": "lorax"}), "unknown method 'lorax'; registered methods:"),
])
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises(peftkit.ConfigError, match=match):
        make()


def test_targets_that_match_nothing_list_the_linear_modules():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(peftkit.ConfigError, match="no module matched targets \\['q_prj'\\].*q_proj, k_proj, v_proj"):
        peftkit.apply(model, peftkit.LoRAConfig(targets=["q_prj"]))
    assert_unchanged(model, before)


def test_pissa_rank_above_layer_size_fails_at_apply_and_rolls_back():
    model = mlp()
    before = snapshot(model)
    with pytest.raises(peftkit.ConfigError, match="r <= min"):
        peftkit.apply(model, peftkit.LoRAConfig(r=20, init="pissa", targets=["fc1", "fc2"]))
    assert_unchanged(model, before)


def test_target_syntax():
    from peftkit.core.inject import find_targets

    model = tiny_llama()
    names = find_targets(model, peftkit.LoRAConfig(targets="all-linear"))
    assert "lm_head" not in names and len(names) == 14
    names = find_targets(model, peftkit.LoRAConfig(targets=["re:.*\\.1\\.self_attn\\.(q|v)_proj"]))
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    names = find_targets(model, peftkit.LoRAConfig(targets="all-linear", exclude=["mlp.up_proj"], layers=[0]))
    assert len(names) == 6 and all(".0." in n for n in names) and not any("up_proj" in n for n in names)


def test_modules_to_save_trains_and_saves_the_head(tmp_path):
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]))
    assert model.lm_head.weight.requires_grad
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    peftkit.save(model, tmp_path)
    assert "lm_head.weight" in read_adapter(tmp_path)[2]
    fresh = peftkit.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(fresh.lm_head.weight, model.lm_head.weight)
    with peftkit.disabled(model):  # the original head comes back while disabled
        torch.testing.assert_close(model.lm_head.weight, tiny_llama().lm_head.weight)


def test_summary_table_lists_adapted_modules(capsys):
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["q_proj"]))
    text = peftkit.print_summary(model)
    assert "model.layers.0.self_attn.q_proj" in text and "LoRALinear" in text
    assert str(peftkit.trainable_parameters(model)) in capsys.readouterr().out


def test_state_dict_of_adapted_model_keeps_base_key_names():
    model = tiny_llama()
    base_keys = set(model.state_dict())
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["q_proj"]))
    keys = set(model.state_dict())
    assert base_keys <= keys and not any(".base." in k for k in keys)
    model.load_state_dict(model.state_dict())  # and loads back under those names
