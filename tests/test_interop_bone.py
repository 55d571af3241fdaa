"""Bone <-> Hugging Face peft MiSS with init_weights="bat", both directions, equal outputs."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftkit
from peftkit.methods.bone import BoneConfig

from tiny_models import MODELS, example_inputs, output_of

peft = pytest.importorskip("peft")  # a test dependency: these tests run peft itself


def _randomize(params, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


# --- Bone <-> Hugging Face peft MiSS "bat" ------------------------------------------------------

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
INTEROP = {  # id: (model, peftkit config, the same adapter as a peft config)
    "llama": ("llama", lambda: BoneConfig(r=8, targets=LLAMA_TARGETS),
              lambda: peft.MissConfig(r=8, init_weights="bat", target_modules=LLAMA_TARGETS)),
    "bert-classifier": ("bert",
                        lambda: BoneConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]),
                        lambda: peft.MissConfig(r=4, init_weights="bat", target_modules=["query", "value"],
                                                task_type="SEQ_CLS")),
}


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _perturb(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


def _assert_same_outputs(ours, theirs, kind):
    inputs = example_inputs(kind)
    with torch.no_grad():
        a, b = output_of(ours, inputs), output_of(theirs, inputs)
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", INTEROP.values(), ids=INTEROP.keys())
def test_bone_to_peft_miss_bat(case, tmp_path, quiet):
    kind, ours_cfg, _ = case
    model = peftkit.apply(MODELS[kind](0), ours_cfg())
    _perturb(p for p in model.parameters() if p.requires_grad)
    peftkit.save(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](0), tmp_path).eval()
    assert theirs.peft_config["default"].init_weights == "bat"
    _assert_same_outputs(model, theirs, kind)
    _assert_same_outputs(model, peftkit.load(MODELS[kind](0), tmp_path), kind)


@pytest.mark.parametrize("case", INTEROP.values(), ids=INTEROP.keys())
def test_peft_miss_bat_to_bone(case, tmp_path, quiet):
    kind, _, peft_cfg = case
    theirs = peft.get_peft_model(MODELS[kind](0), peft_cfg()).eval()
    _perturb(p for p in theirs.parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load(MODELS[kind](0), tmp_path)
    assert isinstance(ours.peftkit_state.config, BoneConfig)
    _assert_same_outputs(ours, theirs, kind)


def test_peft_miss_other_variants_are_refused(tmp_path, quiet):
    balance = peft.MissConfig(r=8, target_modules=["q_proj"])  # init_weights=True: MiSS "balance", not Bone
    peft.get_peft_model(MODELS["llama"](0), balance).save_pretrained(tmp_path)
    model = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match="init_weights='bat'"):
        peftkit.load(model, tmp_path)
    assert not peftkit.has_adapter(model)


def test_bone_on_conv1d_cannot_be_exported_to_peft(tmp_path):
    model = peftkit.apply(MODELS["gpt2"](0), BoneConfig(r=8, targets=["c_attn"]))
    with pytest.raises(peftkit.ConfigError, match="nn.Linear only.*format='peftkit'"):
        peftkit.save(model, tmp_path, format="peft")
    assert not list(tmp_path.iterdir())


# === Hydra =========================================================================================
