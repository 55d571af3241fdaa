"""RandLoRA and DiffuseKronA against Hugging Face peft (0.21.2), both directions, as in test_interop.py.

* RandLoRA <-> peft RANDLORA: the seeded bases are peft's to the bit, peft's files (with or without the
  bases) load with equal outputs, and peft loads peftkit's export (which writes the bases once);
* DiffuseKronA <-> peft LOKR with whole w1, w2: equal delta weights for equal factors, files both ways.

Adapter weights are perturbed before saving, so a wrong key, pairing or scale shows up.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.core import weights
from peftkit.methods.kronecker import DiffuseKronAConfig, factor_pair
from peftkit.methods.randlora import RandLoRAConfig

from tiny_models import MODELS, example_inputs

peft = pytest.importorskip("peft")

TOL = 1e-5


@dataclass
class Case:
    """One adapter on one tiny model, as a peftkit config and as the equivalent peft config."""

    kind: str
    peftkit: Callable[[], peftkit.AdapterConfig]
    peft: Callable[[], object]


R, K = RandLoRAConfig, DiffuseKronAConfig
CASES = {
    "randlora-mlp": Case("mlp", lambda: R(r=4, alpha=8, targets=["fc1", "fc2"]),
                         lambda: peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=["fc1", "fc2"])),
    "randlora-llama-shapes": Case(  # three shapes slice one pair of bases
        "llama", lambda: R(r=3, alpha=6, seed=7, targets=["q_proj", "up_proj", "down_proj"]),
        lambda: peft.RandLoraConfig(r=3, randlora_alpha=6, projection_prng_key=7,
                                    target_modules=["q_proj", "up_proj", "down_proj"])),
    "randlora-gpt2-conv1d": Case(
        "gpt2", lambda: R(r=4, alpha=8, targets=["c_attn", "c_proj"]),
        lambda: peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "randlora-sparse-dropout": Case(
        "llama", lambda: R(r=4, alpha=4, bases="sparse", dropout=0.1, targets=["k_proj", "down_proj"]),
        lambda: peft.RandLoraConfig(r=4, randlora_alpha=4, sparse=True, randlora_dropout=0.1,
                                    target_modules=["k_proj", "down_proj"])),
    "randlora-very-sparse-layers": Case(
        "llama", lambda: R(r=2, alpha=2, bases="very_sparse", targets=["v_proj", "gate_proj"], layers=[1]),
        lambda: peft.RandLoraConfig(r=2, randlora_alpha=2, very_sparse=True, target_modules=["v_proj", "gate_proj"],
                                    layers_to_transform=[1])),
    "kron-llama-sqrt": Case(  # 32 -> (4, 8), 64 -> (8, 8); peft keeps w2 whole from r = 4
        "llama", lambda: K(alpha=0.5, targets=["q_proj", "up_proj", "down_proj"]),
        lambda: peft.LoKrConfig(r=4, alpha=2, target_modules=["q_proj", "up_proj", "down_proj"])),
    "kron-mlp-factor": Case(  # decompose_factor 2: A (2, 2) everywhere
        "mlp", lambda: K(factor=2, alpha=1.5, targets=["fc1", "fc2"]),
        lambda: peft.LoKrConfig(r=8, alpha=12, decompose_factor=2, target_modules=["fc1", "fc2"])),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about fan_in_fan_out, save_projection, missing base keys ...
        yield


def _perturb(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


def _output(model, kind: str) -> torch.Tensor:
    out = model(**example_inputs(kind))
    return out if isinstance(out, torch.Tensor) else out.logits


def _compare(ours, theirs, kind: str) -> None:
    a, b = _output(ours, kind), _output(theirs, kind)
    assert a.shape == b.shape and (a - b).abs().max().item() < TOL


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_peftkit_to_peft(case, tmp_path):
    model = peftkit.apply(MODELS[case.kind](), case.peftkit())
    _perturb(p for p in model.parameters() if p.requires_grad)
    peftkit.save(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(MODELS[case.kind](), tmp_path).eval()
    _compare(model, theirs, case.kind)
    _compare(model, peftkit.load(MODELS[case.kind](), tmp_path), case.kind)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_peft_to_peftkit(case, tmp_path):
    theirs = peft.get_peft_model(MODELS[case.kind](), case.peft()).eval()
    _perturb(p for p in theirs.parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load(MODELS[case.kind](), tmp_path)
    _compare(ours, theirs, case.kind)


# --- RandLoRA ------------------------------------------------------------------------------------
def _peft_layers(model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "randlora_lambda")
            and isinstance(m.randlora_lambda, torch.nn.ParameterDict)}


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("randlora")])
def test_randlora_bases_and_delta_weights_equal_peft(name):
    case = CASES[name]
    theirs = peft.get_peft_model(MODELS[case.kind](), case.peft())
    _perturb(p for p in theirs.parameters() if p.requires_grad)
    ours = peftkit.apply(MODELS[case.kind](), case.peftkit())
    for module_name, their_layer in _peft_layers(theirs).items():
        layer = ours.get_submodule(module_name)
        a, b = layer.bases.tensors()
        assert torch.equal(a, their_layer.randlora_A["default"]) and torch.equal(b, their_layer.randlora_B["default"])
        with torch.no_grad():
            layer.randlora_lambda.copy_(their_layer.randlora_lambda["default"])
            layer.randlora_gamma.copy_(their_layer.randlora_gamma["default"])
            their_delta = their_layer.get_delta_weight("default")
            if weights.layer_kind(layer.base) == "conv1d":
                their_delta = their_delta.T  # peft returns Conv1D's (in, out) layout
            torch.testing.assert_close(layer.delta_weight(), their_delta, atol=1e-6, rtol=1e-6)


def test_randlora_peft_file_without_bases(tmp_path):
    case = CASES["randlora-llama-shapes"]
    theirs = peft.get_peft_model(MODELS["llama"](), peft.RandLoraConfig(
        r=3, randlora_alpha=6, projection_prng_key=7, save_projection=False,
        target_modules=["q_proj", "up_proj", "down_proj"])).eval()
    _perturb(p for p in theirs.parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path)
    assert not any("randlora_A" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    _compare(peftkit.load(MODELS[case.kind](), tmp_path), theirs, case.kind)


def test_randlora_export_writes_the_bases_once(tmp_path):
    model = peftkit.apply(MODELS["llama"](), CASES["randlora-llama-shapes"].peftkit())
    peftkit.save(model, tmp_path, format="peft")
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(k for k in keys if "randlora_A" in k or "randlora_B" in k) == [
        "base_model.randlora_A", "base_model.randlora_B"]
    assert len(keys) == 2 + 2 * 6  # the bases, and lambda, gamma of the 6 layers


def test_randlora_peft_file_with_other_bases_is_refused(tmp_path):
    peft.get_peft_model(MODELS["mlp"](), CASES["randlora-mlp"].peft()).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.fc2.randlora_B"] = tensors["base_model.model.fc2.randlora_B"] * 2
    save_file(tensors, path)
    model = MODELS["mlp"]()
    with pytest.raises(peftkit.AdapterFileError, match=r"fc2.randlora_B differs from the tensor peftkit re-creates"):
        peftkit.load(model, tmp_path)
    assert not peftkit.has_adapter(model) and isinstance(model.fc2, torch.nn.Linear)


# --- DiffuseKronA and LoKr -----------------------------------------------------------------------
def test_factor_pair_is_peft_lokr_factorization():
    from peft.tuners.lokr.layer import factorization

    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 6, 8, 16, 20, 64, 500):
            assert factor_pair(dim, factor) == factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("factor", [-1, 4])
def test_kron_delta_weight_equals_lokr_with_whole_factors(factor):
    """peft LoKr with undecomposed w1 (a1 x a2), w2 (b1 x b2) set to A, B: the same delta weight."""
    cfg = peft.LoKrConfig(r=32, alpha=8, decompose_factor=factor, target_modules=["up_proj", "down_proj"])
    theirs = peft.get_peft_model(MODELS["llama"](), cfg)
    ours = peftkit.apply(MODELS["llama"](), DiffuseKronAConfig(factor=factor, alpha=8 / 32,
                                                               targets=["up_proj", "down_proj"]))
    _perturb(p for p in ours.parameters() if p.requires_grad)
    for name in ours.peftkit_state.adapted:
        layer, their_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        assert their_layer.lokr_w1["default"].shape == layer.kron_A.shape
        assert their_layer.lokr_w2["default"].shape == layer.kron_B.shape
        with torch.no_grad():
            their_layer.lokr_w1["default"].copy_(layer.kron_A)
            their_layer.lokr_w2["default"].copy_(layer.kron_B)
            torch.testing.assert_close(layer.delta_weight(), their_layer.get_delta_weight("default"),
                                       atol=1e-7, rtol=1e-6)


def test_kron_fixed_equal_factors_export_as_decompose_factor(tmp_path):
    model = peftkit.apply(MODELS["llama"](), DiffuseKronAConfig(a1=4, a2=4, alpha=2.0, targets=["o_proj", "up_proj"]))
    _perturb(p for p in model.parameters() if p.requires_grad)
    peftkit.save(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path).eval()
    assert theirs.peft_config["default"].decompose_factor == 4
    _compare(model, theirs, "llama")


@pytest.mark.parametrize("kind,config,match", [
    ("gpt2", DiffuseKronAConfig(targets=["c_attn"]), "GPT-2 Conv1D"),
    ("llama", DiffuseKronAConfig(a1=2, a2=8, targets=["q_proj"]), "no single peft decompose_factor"),
])
def test_kron_exports_peft_cannot_express(kind, config, match, tmp_path):
    model = peftkit.apply(MODELS[kind](), config)
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.save(model, tmp_path, format="peft")


def test_kron_refuses_lokr_with_decomposed_w2(tmp_path):
    # r=1 < max(b1, b2) / 2: peft stores w2 as lokr_w2_a @ lokr_w2_b, which no DiffuseKronA layer holds
    peft.get_peft_model(MODELS["llama"](), peft.LoKrConfig(r=1, target_modules=["q_proj"])).save_pretrained(tmp_path)
    model = MODELS["llama"]()
    with pytest.raises(peftkit.AdapterFileError, match="missing .*lokr_w2.*unexpected .*lokr_w2_a"):
        peftkit.load(model, tmp_path)
    assert not peftkit.has_adapter(model)
