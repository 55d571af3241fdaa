"""Named adapters: several adapters of any methods on one model, switched, stacked, saved (peft's multi-adapter
layout, both directions), merged by name, deleted; mixtures per sample (PETALface) and mixed-batch generate."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn
from test_mixed_batches import assert_generate_matches

import peftkit

from test_contract import perturb
from tiny_models import MODELS, example_inputs, output_of, tiny_llama

QV = ["q_proj", "v_proj"]


def _llama_fr_de():
    """LoRA "fr" and (IA)^3 "de" on the same q_proj/v_proj of one tiny Llama, both trained away from init."""
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoRAConfig(r=4, targets=QV), name="fr")
    perturb(model, seed=3)
    peftkit.apply(model, peftkit.IA3Config(targets=QV, feedforward=[]), name="de")
    perturb(model, seed=5)
    return model


def _alone(config, state: dict):
    """A fresh model with one adapter holding the given tensors (what a named adapter must equal)."""
    model = tiny_llama()
    peftkit.apply(model, config)
    model.load_state_dict(state, strict=False)
    return model


def test_first_adapter_is_default_and_unnamed_calls_keep_their_meaning():
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoRAConfig(r=2))
    assert peftkit.adapters(model) == ["default"] and peftkit.active_adapters(model) == ["default"]
    with pytest.raises(peftkit.ConfigError, match="already has a peftkit adapter"):
        peftkit.apply(model, peftkit.LoRAConfig(r=2))
    with pytest.raises(peftkit.ConfigError, match="already has an adapter named 'default'"):
        peftkit.apply(model, peftkit.LoRAConfig(r=2), name="default")
    peftkit.apply(model, peftkit.IA3Config(), replace=True)  # without a name: replaces every adapter
    assert peftkit.adapters(model) == ["default"] and model.peftkit_state.config.method == "ia3"


def test_each_named_adapter_equals_itself_alone_and_stacked_composes_in_order():
    model = _llama_fr_de()
    inputs = example_inputs("llama")
    assert peftkit.adapters(model) == ["fr", "de"] and peftkit.active_adapters(model) == ["de"]
    fr_state = peftkit.core.io.adapter_state_dict(model, "fr")
    de_state = peftkit.core.io.adapter_state_dict(model, "de")
    with torch.no_grad():
        de = output_of(model, inputs)
        peftkit.set_active(model, "fr")
        fr = output_of(model, inputs)
        peftkit.set_active(model, ["fr", "de"])
        both = output_of(model, inputs)
        with peftkit.disabled(model):
            base = output_of(model, inputs)
        torch.testing.assert_close(fr, output_of(_alone(peftkit.LoRAConfig(r=4, targets=QV), fr_state), inputs))
        torch.testing.assert_close(de, output_of(_alone(peftkit.IA3Config(targets=QV, feedforward=[]), de_state),
                                                 inputs))
        torch.testing.assert_close(base, output_of(tiny_llama(), inputs), atol=0, rtol=0)
    # stacked: (IA)^3 scales what q_proj + LoRA compute: l * (W x + B A x)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, q.in_features)
    lora, plain = q.base, q.plain_base
    expected = q.ia3_l.view(-1) * (plain(x) + (x @ lora.lora_A.T @ lora.lora_B.T) * lora.scaling)
    torch.testing.assert_close(q(x), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(both, fr) and not torch.allclose(both, de)


def test_inactive_adapters_are_frozen_and_switching_restores_their_flags():
    model = _llama_fr_de()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("ia3" in n for n in trainable)
    peftkit.set_active(model, ["fr", "de"])
    both = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in both if "lora" in n} and {n for n in both if "ia3" in n}
    with pytest.raises(peftkit.ConfigError, match="no adapter named"):
        peftkit.set_active(model, "es")


def test_save_writes_peft_multi_adapter_layout_and_load_reads_it_back(tmp_path):
    model = _llama_fr_de()
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["o_proj"]), name="default")
    perturb(model, seed=7)
    peftkit.set_active(model, ["fr", "de", "default"])
    inputs = example_inputs("llama")
    with torch.no_grad():
        expected = output_of(model, inputs)
    peftkit.save(model, tmp_path)
    assert (tmp_path / "peftkit_adapter.json").is_file()  # "default" in the directory itself, as peft
    assert (tmp_path / "fr" / "adapter.safetensors").is_file() and (tmp_path / "de" / "peftkit_adapter.json").is_file()
    fresh = peftkit.load(tiny_llama(), tmp_path)
    assert sorted(peftkit.adapters(fresh)) == ["de", "default", "fr"]
    peftkit.set_active(fresh, ["fr", "de", "default"])
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, inputs), expected)
    one = peftkit.load(tiny_llama(), tmp_path, name="de")  # a single adapter of the directory
    assert peftkit.adapters(one) == ["de"]


def test_a_failed_second_load_leaves_the_first_adapter_and_the_model_as_they_were(tmp_path):
    model = _llama_fr_de()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.save(model, tmp_path / "fr", name="fr")
    (tmp_path / "fr" / "adapter.safetensors").write_bytes(b"broken")
    with pytest.raises(peftkit.AdapterFileError):
        peftkit.load(model, tmp_path / "fr", name="es")
    assert peftkit.adapters(model) == ["fr", "de"] and peftkit.active_adapters(model) == ["de"]
    now = model.state_dict()
    assert set(now) == set(before) and all(torch.equal(now[k], v) for k, v in before.items())
    with pytest.raises(peftkit.ConfigError, match="cannot share"):  # PiSSA rewrites a weight LoRA "fr" wraps
        peftkit.apply(model, peftkit.LoRAConfig(r=2, init="pissa", targets=["q_proj"]), name="pi")
    assert peftkit.adapters(model) == ["fr", "de"]


def _peft_two_adapters():
    base = tiny_llama()
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False))
    theirs.add_adapter("fr", peft.LoraConfig(r=2, lora_alpha=2, target_modules=QV, init_lora_weights=False))
    return theirs.eval()


def test_peftkit_reads_a_peft_multi_adapter_directory(tmp_path):
    theirs = _peft_two_adapters()
    theirs.save_pretrained(tmp_path)  # "default" at the top, "fr" in fr/
    inputs = example_inputs("llama")
    ours = peftkit.load(tiny_llama(), tmp_path)
    assert peftkit.adapters(ours) == ["default", "fr"]
    with torch.no_grad():
        for name in ("default", "fr"):
            theirs.set_adapter(name)
            peftkit.set_active(ours, name)
            torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-5, rtol=1e-5)


def test_peft_reads_a_peftkit_multi_adapter_directory(tmp_path):
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoRAConfig(r=4, targets=QV))
    perturb(model, seed=3)
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=QV), name="fr")  # stacked on the same modules
    perturb(model, seed=5)
    peftkit.save(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    theirs.load_adapter(tmp_path / "fr", adapter_name="fr")
    inputs = example_inputs("llama")
    with torch.no_grad():
        for name in ("default", "fr"):
            theirs.set_adapter(name)
            peftkit.set_active(model, name)
            torch.testing.assert_close(output_of(model, inputs), output_of(theirs, inputs), atol=1e-5, rtol=1e-5)


def test_merge_by_name_keeps_what_the_stack_computes_and_refuses_what_would_not():
    model = _llama_fr_de()
    peftkit.set_active(model, ["fr", "de"])
    inputs = example_inputs("llama")
    with torch.no_grad():
        stacked = output_of(model, inputs)
        with pytest.raises(peftkit.MergeError, match="stacked on the same module"):
            peftkit.merge(model, "de")  # (IA)^3 scales W + BA, not W alone, while "fr" is active under it
        assert not any(layer.merged for layer in peftkit.core.apply.adapter_layers_of(model, "de"))
        peftkit.merge(model, "fr")  # additive: commutes with what sits on top
        torch.testing.assert_close(output_of(model, inputs), stacked, atol=1e-5, rtol=1e-5)
        with pytest.raises(peftkit.ConfigError, match="merged"):
            peftkit.set_active(model, "de")
        peftkit.merge(model, "de")  # nothing unmerged under it any more
        torch.testing.assert_close(output_of(model, inputs), stacked, atol=1e-5, rtol=1e-5)
        peftkit.unmerge(model)
        peftkit.delete(model, "fr")
        peftkit.delete(model, "de")
        torch.testing.assert_close(output_of(model, inputs), output_of(tiny_llama(), inputs), atol=1e-6, rtol=0)
    assert not peftkit.has_adapter(model)


def test_delete_gives_the_base_back_and_keeps_the_other_adapter():
    model = _llama_fr_de()
    inputs = example_inputs("llama")
    de_state = peftkit.core.io.adapter_state_dict(model, "de")
    peftkit.delete(model, "fr")
    assert peftkit.adapters(model) == ["de"]
    with torch.no_grad():
        alone = output_of(_alone(peftkit.IA3Config(targets=QV, feedforward=[]), de_state), inputs)
        torch.testing.assert_close(output_of(model, inputs), alone, atol=1e-6, rtol=0)
    assert set(model.state_dict()) == set(_alone(peftkit.IA3Config(targets=QV, feedforward=[]), de_state).state_dict())


class _Holder(nn.Module):
    """A user model whose submodules are called `base` (which adapter layers also call what they wrap)."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(8, 8)
        self.head = nn.Sequential()
        self.head.base = nn.Linear(8, 3)

    def forward(self, x):
        return self.head.base(torch.relu(self.base(x)))


def test_a_model_with_submodules_called_base_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = _Holder()
    plain_keys = set(model.state_dict())
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["base"], modules_to_save=["head.base"]))
    perturb(model)
    assert set(model.state_dict()) >= plain_keys
    x = torch.randn(4, 8)
    expected = model(x)
    peftkit.save(model, tmp_path)
    torch.manual_seed(0)
    fresh = _Holder()
    peftkit.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), expected)
    assert set(peftkit.unload(fresh).state_dict()) == plain_keys


def test_per_sample_weights_mix_two_loras_as_petalface():
    """PETALface: y = W0 x + (1 - a) LoRA_1(x) + a LoRA_2(x), with a per sample (methods.md §2.12)."""
    model = nn.Sequential(nn.Linear(6, 5))
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["0"]), name="low")
    perturb(model, seed=3)
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["0"]), name="high")
    perturb(model, seed=5)
    x = torch.randn(4, 6)
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0])
    outer = model[0]
    inner = outer.base

    def delta(layer):
        return (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling

    expected = outer.plain_base(x) + (1 - alpha)[:, None] * delta(inner) + alpha[:, None] * delta(outer)
    mixed = model(x, adapter_names=[("low", "high")] * 4, adapter_weights=[(1 - a, a) for a in alpha.tolist()])
    torch.testing.assert_close(mixed, expected, atol=1e-6, rtol=1e-5)
    # a = 0 and a = 1 are each LoRA alone
    for name, row in (("low", 0), ("high", 3)):
        peftkit.set_active(model, name)
        torch.testing.assert_close(mixed[row], model(x)[row], atol=1e-6, rtol=1e-5)


def test_mixed_batch_generate_with_two_methods_stacked_on_one_module():
    assert_generate_matches(_llama_fr_de(), example_inputs("llama", batch=3)["input_ids"], ["fr", peftkit.BASE, "de"],
                            {})


def test_mixed_batch_errors_say_what_to_do():
    model = _llama_fr_de()
    inputs = example_inputs("llama", batch=2)
    with pytest.raises(peftkit.ConfigError, match="does not have"):
        model(**inputs, adapter_names=["fr", "es"])
    with pytest.raises(peftkit.ConfigError, match="one entry per sample"):
        model(**inputs, adapter_names=["fr", "de", "fr"])
    with pytest.raises(peftkit.ConfigError, match=r"adapter_weights\[0\]"):
        model(**inputs, adapter_names=["fr", "de"], adapter_weights=[(0.5, 0.5), 1.0])
    with torch.no_grad():
        model(**inputs)  # a failed call leaves no routing behind
    peftkit.apply(model, peftkit.LNTuningConfig(), name="norms")  # trains base parameters in place
    with pytest.raises(peftkit.ConfigError, match="trains base parameters in place"):
        model(**inputs, adapter_names=["fr", "de"])


def test_every_tiny_architecture_takes_two_named_loras():
    for kind in ("gpt2", "bert", "t5", "opt", "phi3"):
        model = MODELS[kind](0)
        peftkit.apply(model, peftkit.LoRAConfig(r=2), name="x")
        peftkit.apply(model, peftkit.LoRAConfig(r=2), name="y")
        inputs = example_inputs(kind, batch=3)
        with torch.no_grad():
            output_of(model, {**inputs, "adapter_names": ["x", "y", peftkit.BASE]})
        peftkit.unload(model)
        assert not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())


def test_mixed_batch_benchmark_runs_for_both_libraries():
    """benchmarks/bench_mixed.py on a tiny setting: each library's mixed batch gives sample 0 the output of
    its adapter alone (the job asserts it), so the timed runs compute the same thing."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bench_mixed import job

    for lib in ("peftkit", "peft"):
        row = job(lib, "small", r=4, seq=4, repeats=1, threads=1)
        assert row["lib"] == lib and row["one_s"] > 0 and row["mixed_s"] > 0


def test_two_active_rank_budget_adapters_train_together_each_on_its_own_budget():
    """schedule_for with several active adapters runs each one's schedule (AdaLoRA's budget per adapter)."""
    model = tiny_llama()
    peftkit.apply(model, peftkit.AdaLoRAConfig(init_r=4, target_r=2), name="a")
    peftkit.apply(model, peftkit.LoRAConfig(r=2), name="b")
    peftkit.apply(model, peftkit.AdaLoRAConfig(init_r=4, target_r=1, targets=["o_proj"]), name="c")
    peftkit.set_active(model, ["a", "b", "c"])
    schedule = peftkit.schedule_for(model, total_steps=20)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = example_inputs("llama")
    for step in range(1, 21):
        loss = model(**inputs, labels=inputs["input_ids"]).loss + schedule.extra_loss(model)
        loss.backward()
        schedule.on_after_backward(step, model, optimizer)
        optimizer.step()
        optimizer.zero_grad()
    for name, target in (("a", 2), ("c", 1)):
        layers = peftkit.core.adapters.get_state(model, name).layers.values()
        assert sum(int((layer.lora_E != 0).sum()) for layer in layers) == target * len(layers)


def test_training_with_several_adapters_on_the_model(tmp_path):
    """Two LoRAs stacked on fc1 train together (backward through both fused kernels); checkpoints hold the one
    adapter being trained and resume it; several active adapters with checkpoints are refused, saying why."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from peftkit.train.loop import train

    from train_toy import base_classifier, stack, toy_config, toy_data

    def two():
        model = base_classifier(0)
        torch.manual_seed(1)
        peftkit.apply(model, peftkit.LoRAConfig(r=4, targets=["fc1"]), name="x")
        peftkit.apply(model, peftkit.LoRAConfig(r=4, targets=["fc1", "fc2"]), name="y")
        return model

    model = two()
    peftkit.set_active(model, ["x", "y"])
    with pytest.raises(peftkit.ConfigError, match="a checkpoint holds one adapter"):
        train(model, toy_data(32), None, toy_config(tmp_path / "a", max_steps=4, save_every=2), stack)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train(model, toy_data(32), None, toy_config(tmp_path / "b", max_steps=4, save_every=0, eval_every=0),
                   stack)
    assert result["status"] == "completed"
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # both trained
    assert {p.name for p in (tmp_path / "b" / "adapter").iterdir() if p.is_dir()} == {"x", "y"}
    cut = toy_config(tmp_path / "c", max_steps=8, save_every=4, eval_every=0)
    train(two(), toy_data(32), None, toy_config(tmp_path / "c", max_steps=4, save_every=4, eval_every=0), stack)
    resumed = train(two(), toy_data(32), None, cut, stack, resume=True)  # "y" alone, from its checkpoint
    assert resumed["status"] == "completed" and resumed["steps"] == 8


def test_a_single_named_adapter_keeps_its_name_through_save_and_load(tmp_path):
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoRAConfig(r=2), name="fr")
    peftkit.save(model, tmp_path / "all")  # as peft: a non-default adapter in its own subdirectory
    assert (tmp_path / "all" / "fr" / "peftkit_adapter.json").is_file()
    assert peftkit.adapters(peftkit.load(tiny_llama(), tmp_path / "all")) == ["fr"]
    peftkit.save(model, tmp_path / "one", name="fr")  # named: into the directory itself
    assert (tmp_path / "one" / "peftkit_adapter.json").is_file()
    assert peftkit.adapters(peftkit.load(tiny_llama(), tmp_path / "one", name="fr")) == ["fr"]


def test_a_directory_whose_second_adapter_is_broken_leaves_the_model_as_it_was(tmp_path):
    """The first adapter of the directory wrote trained values into base parameters (LN tuning); the failed
    load of the second must give those back too, not only take the layers out."""
    from unchanged import assert_unchanged, snapshot

    model = tiny_llama()
    peftkit.apply(model, peftkit.LNTuningConfig(), name="norms")
    perturb(model, seed=3)
    peftkit.apply(model, peftkit.LoRAConfig(r=2), name="lora")
    peftkit.save(model, tmp_path)
    (tmp_path / "lora" / "adapter.safetensors").write_bytes(b"broken")
    fresh = tiny_llama()
    before = snapshot(fresh)
    with pytest.raises(peftkit.AdapterFileError):
        peftkit.load(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_an_inactive_adapter_that_trains_base_parameters_saves_its_trained_values(tmp_path):
    model = tiny_llama()
    peftkit.apply(model, peftkit.LNTuningConfig(), name="norms")
    perturb(model, seed=3)
    trained = {k: v.clone() for k, v in peftkit.core.io.adapter_state_dict(model, "norms").items()}
    peftkit.apply(model, peftkit.LoRAConfig(r=2), name="lora")  # "norms" is now inactive: the base holds W0
    saved = peftkit.core.io.adapter_state_dict(model, "norms")
    assert all(torch.equal(saved[k], v) for k, v in trained.items())
    peftkit.save(model, tmp_path, name="norms")
    again = peftkit.load(tiny_llama(), tmp_path)
    assert all(torch.equal(peftkit.core.io.adapter_state_dict(again)[k], v) for k, v in trained.items())


def test_merging_an_inactive_adapter_activates_it_first():
    model = tiny_llama()
    peftkit.apply(model, peftkit.LNTuningConfig(), name="norms")
    perturb(model, seed=3)
    trained = {k: v.clone() for k, v in peftkit.core.io.adapter_state_dict(model, "norms").items()}
    peftkit.apply(model, peftkit.LoRAConfig(r=2), name="lora")  # "norms" inactive, the base holds originals
    peftkit.merge(model, "norms")
    assert "norms" in peftkit.active_adapters(model)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in trained.items())
