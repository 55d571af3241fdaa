"""Interop with Hugging Face peft (a test dependency), both directions, on tiny models.

* peftkit -> peft: `peftkit.save(model, d, format="peft")`, then `peft.PeftModel.from_pretrained(base, d)`
  gives the outputs of the peftkit model (and `peftkit.load` reads the same directory back);
* peft -> peftkit: `peft_model.save_pretrained(d)`, then `peftkit.load(base, d)` gives peft's outputs.

Adapter weights are perturbed with random values before saving, so a wrong key or scale shows up.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit

from tiny_models import MODELS, example_inputs

peft = pytest.importorskip("peft")

TOL = 1e-5


@dataclass
class Case:
    """One adapter on one tiny model, as a peftkit config and as the equivalent peft config."""

    kind: str
    peftkit: Callable[[], peftkit.AdapterConfig]
    peft: Callable[[], object]


Lk, Pk = peftkit.LoRAConfig, peft.LoraConfig  # short names keep the table readable

CASES = {
    "lora-linear-dropout": Case(
        "llama", lambda: Lk(r=2, alpha=4, dropout=0.1, targets=["q_proj", "v_proj"]),
        lambda: Pk(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])),
    "lora-embedding": Case(
        "llama", lambda: Lk(r=2, targets=["embed_tokens", "o_proj"]),
        lambda: Pk(r=2, target_modules=["embed_tokens", "o_proj"])),
    "lora-gpt2-conv1d": Case(
        "gpt2", lambda: Lk(r=2, targets=["c_attn", "c_proj"]),
        lambda: Pk(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "lora-conv2d-modules-to-save": Case(
        "cnn", lambda: Lk(r=2, targets=["conv1", "head"], modules_to_save=["conv2"]),
        lambda: Pk(r=2, target_modules=["conv1", "head"], modules_to_save=["conv2"])),
    "lora-gaussian": Case(
        "llama", lambda: Lk(r=2, init="gaussian", targets=["k_proj", "down_proj"]),
        lambda: Pk(r=2, init_lora_weights="gaussian", target_modules=["k_proj", "down_proj"])),
    "lora-rslora-patterns": Case(
        "llama", lambda: Lk(r=2, alpha=4, rslora=True, targets=["q_proj", "up_proj"], rank_pattern={"up_proj": 4},
                            alpha_pattern={"layers.1.self_attn.q_proj": 6}),
        lambda: Pk(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "up_proj"],
                   rank_pattern={"up_proj": 4}, alpha_pattern={"layers.1.self_attn.q_proj": 6})),
    "lora-pissa": Case(
        "llama", lambda: Lk(r=2, init="pissa", targets=["q_proj", "gate_proj"], rank_pattern={"gate_proj": 3}),
        lambda: Pk(r=2, init_lora_weights="pissa", target_modules=["q_proj", "gate_proj"],
                   rank_pattern={"gate_proj": 3})),
    "lora-olora-rslora": Case(
        "llama", lambda: Lk(r=2, init="olora", rslora=True, targets=["v_proj"]),
        lambda: Pk(r=2, init_lora_weights="olora", use_rslora=True, target_modules=["v_proj"])),
    "lora-bert-classifier": Case(
        "bert", lambda: Lk(r=2, targets=["query", "value"], modules_to_save=["classifier"]),
        lambda: Pk(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "dora": Case(
        "llama", lambda: peftkit.DoRAConfig(r=2, targets=["q_proj", "down_proj"]),
        lambda: Pk(r=2, use_dora=True, target_modules=["q_proj", "down_proj"])),
    "dora-gpt2": Case(
        "gpt2", lambda: peftkit.DoRAConfig(r=2, targets=["c_attn"]),
        lambda: Pk(r=2, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True)),
    "dora-pissa": Case(
        "llama", lambda: peftkit.DoRAConfig(r=2, init="pissa", targets=["q_proj"]),
        lambda: Pk(r=2, use_dora=True, init_lora_weights="pissa", target_modules=["q_proj"])),
    "ia3": Case(
        "llama", lambda: peftkit.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
        lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "ia3-gpt2": Case(
        "gpt2", lambda: peftkit.IA3Config(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]),
        lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                               fan_in_fan_out=True)),
    "prompt-causal-lm": Case(
        "llama", lambda: peftkit.PromptTuningConfig(num_virtual_tokens=3),
        lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    "prompt-seq-cls": Case(
        "bert", lambda: peftkit.PromptTuningConfig(num_virtual_tokens=3),
        lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about fan_in_fan_out, missing head keys, ...
        yield


def _inputs(kind: str) -> dict:
    inputs = example_inputs(kind)
    if kind == "bert":  # exercise token_type_ids padding (peft and peftkit pad them with zeros)
        ids = inputs["input_ids"]
        inputs["token_type_ids"] = (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids)
    if kind == "llama":
        inputs["labels"] = inputs["input_ids"]
    return inputs


def _perturb(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


def _compare(ours, theirs, kind: str) -> None:
    inputs = _inputs(kind)
    out_a, out_b = ours(**inputs), theirs(**inputs)
    a, b = (out_a, out_b) if isinstance(out_a, torch.Tensor) else (out_a.logits, out_b.logits)
    # causal-LM prompt tuning: both return logits for the virtual and the real positions
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL
    if kind == "llama":
        assert abs(out_a.loss.item() - out_b.loss.item()) < TOL


def _base(kind: str):
    return MODELS[kind]()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_peftkit_to_peft(case, tmp_path):
    model = peftkit.apply(_base(case.kind), case.peftkit())
    _perturb(p for p in model.parameters() if p.requires_grad)
    peftkit.save(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(_base(case.kind), tmp_path).eval()
    _compare(model, theirs, case.kind)
    back = peftkit.load(_base(case.kind), tmp_path)  # the exported directory reads back in peftkit
    _compare(model, back, case.kind)
    if getattr(case.peftkit(), "init", None) in ("pissa", "olora"):
        cfg = back.peftkit_state.config  # folded into a plain LoRA of twice the rank on the original base
        assert cfg.init == "kaiming" and cfg.r == 2 * case.peftkit().r


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_peft_to_peftkit(case, tmp_path):
    theirs = peft.get_peft_model(_base(case.kind), case.peft()).eval()
    _perturb(p for p in theirs.parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load(_base(case.kind), tmp_path)
    _compare(ours, theirs, case.kind)


def test_vllm_fields_and_exact_targets(tmp_path):
    model = _base("llama")
    model.config._name_or_path = "org/tiny-llama"
    peftkit.apply(model, peftkit.LoRAConfig(r=4, alpha=16, targets="all-linear", layers=[1]))
    peftkit.save(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == "org/tiny-llama" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == sorted(model.peftkit_state.adapted)  # exact names: layer 1 only
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 7  # A and B of the 7 linear layers of block 1


# --- errors: clear messages, model left unchanged ---------------------------------------------
def _snapshot(model):
    return ([type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()})


def _failing_load(directory, error, match, kind: str = "llama"):
    model = _base(kind)
    types, state = _snapshot(model)
    with pytest.raises(error, match=match):
        peftkit.load(model, directory)
    assert [type(m).__name__ for m in model.modules()] == types and not peftkit.has_adapter(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def _peft_dir(directory, config):
    peft.get_peft_model(_base("llama"), config).save_pretrained(directory)
    return directory


@pytest.fixture
def peft_dir(tmp_path):
    """A peft-written PiSSA LoRA (its load derives the initial factors: the failure paths must not leak them)."""
    return _peft_dir(tmp_path, peft.LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj"]))


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("config", [peftkit.FullFineTuneConfig(), peftkit.HeadOnlyConfig()],
                         ids=["full", "head-only"])
def test_methods_peft_lacks(config, tmp_path):
    model = peftkit.apply(_base("llama"), config)
    with pytest.raises(peftkit.ConfigError, match="no Hugging Face peft equivalent.*format='peftkit'"):
        peftkit.save(model, tmp_path, format="peft")
    assert not list(tmp_path.iterdir())


def test_truncated_weights(peft_dir):
    path = peft_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    _failing_load(peft_dir, peftkit.AdapterFileError, "truncated or corrupt")


def test_corrupt_config(peft_dir):
    (peft_dir / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    _failing_load(peft_dir, peftkit.AdapterFileError, "not valid JSON")


@pytest.mark.parametrize("changes, match", [
    ({"lora_rnak": 4}, r"field\(s\) \['lora_rnak'\] that peftkit does not know for LORA; known fields: .*lora_alpha"),
    ({"bias": "all"}, "cannot express peft's bias='all'"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'"),
    ({"peft_type": "BOFT"}, "peft_type 'BOFT'; supported peft types: (.*, )?IA3, (.*, )?LORA, (.*, )?PROMPT_TUNING"),
    ({"r": 4}, "shapes do not fit"),
])
def test_bad_config(peft_dir, changes, match):
    _edit_config(peft_dir, **changes)
    error = peftkit.AdapterFileError if "shapes" in match else peftkit.ConfigError
    _failing_load(peft_dir, error, match)


def test_missing_and_unexpected_keys(peft_dir):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    _edit_tensors(peft_dir, lambda t: t.update({key.replace("q_proj", "k_proj"): t.pop(key)}))
    _failing_load(peft_dir, peftkit.AdapterFileError,
                  r"missing .*layers\.1\.self_attn\.q_proj\.lora_B.*unexpected .*layers\.1\.self_attn\.k_proj")


def test_changed_base_embedding(tmp_path):
    _peft_dir(tmp_path, peft.LoraConfig(r=2, target_modules=["embed_tokens"]))  # peft saves the base table too
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    _edit_tensors(tmp_path, lambda t: t[key].add_(1.0))
    _failing_load(tmp_path, peftkit.AdapterFileError, "carries its own .*embed_tokens.base_layer.weight")


def test_pissa_on_embedding_is_refused(tmp_path):
    # peft quietly gives embeddings its default init under init_lora_weights="pissa"; peftkit has one init per adapter
    _peft_dir(tmp_path, peft.LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj", "embed_tokens"]))
    _failing_load(tmp_path, peftkit.ConfigError, "'pissa' is defined for linear layers only")


def test_other_base_model(peft_dir):
    _failing_load(peft_dir, peftkit.ConfigError, "no module matched targets", kind="gpt2")


def test_pickle_is_refused(peft_dir):
    (peft_dir / "adapter_model.safetensors").rename(peft_dir / "adapter_model.bin")
    _failing_load(peft_dir, peftkit.AdapterFileError, "pickle")
