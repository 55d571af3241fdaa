"""Small vision models of the project's own: a ViT and a CNN for 28x28 grey images, pretrained here.

No pretrained vision model installs offline, so peftkit pretrains its own on Fashion-MNIST
(`python -m peftkit.train.vision_pretrain`) and ships the checkpoints in `peftkit/assets/vision/`
(`vit-fmnist`, `cnn-fmnist`: safetensors + JSON, no pickle). Vision PEFT methods (SSF, DiffFit,
VQT, SPT ...) are tested by adapting them to digits (`peftkit demo --task vision`).

ViT (Dosovitskiy et al., 2020, arXiv:2010.11929), pre-norm, class token, module names as in timm so
that code written for timm's ViTs finds the same layers:

    patch_embed.proj (Conv2d, kernel = stride = patch)   cls_token, pos_embed (parameters)
    blocks.{i}.norm1, blocks.{i}.attn.qkv, blocks.{i}.attn.proj (nn.Linear),
    blocks.{i}.norm2, blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2 (nn.Linear)
    norm (LayerNorm), head (nn.Linear on the class token)

    x_0 = [cls; patches W_p] + pos,   x' = x + proj(attn(qkv(norm1(x)))),   x'' = x' + fc2(gelu(fc1(norm2(x'))))

CNN: `blocks.{i}.conv` (3x3 Conv2d), `blocks.{i}.norm` (GroupNorm over groups of 8 channels: no
running statistics, so a frozen base behaves the same in train and eval mode), GELU, global mean
pool, `head`.

Both take `pixel_values` (batch, 1, 28, 28), normalised as `images.normalise` does, and return a
transformers `ImageClassifierOutput` (`.logits`, and `.loss` when `labels` are given), so peftkit's
training loop, evaluation and `peftkit train` use them unchanged.

Transfer: MNIST and Fashion-MNIST both have 10 classes, yet a Fashion-MNIST head means nothing for
digits; `load_vision_model` (built-in names) therefore keeps the head's shape but re-initialises it
(`replace_head`), as a fresh classifier head is for text. A saved directory loads as it was saved.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import ImageClassifierOutput

CONFIG_FILE = "peftkit_vision.json"  # marks a saved vision model directory
WEIGHTS_FILE = "model.safetensors"
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "vision"
BUILTINS = ("vit-fmnist", "cnn-fmnist")


@dataclass
class VisionConfig:
    """Shape of a ViT or CNN classifier; saved as JSON next to the weights."""

    architecture: str = "vit"
    """"vit" or "cnn"."""

    image_size: int = 28
    """Height and width of the (square) input images."""

    in_channels: int = 1
    """Input channels (1: grey)."""

    num_classes: int = 10
    """Outputs of the head."""

    patch_size: int = 4
    """ViT: side of the square patches; must divide image_size."""

    dim: int = 96
    """ViT: token width."""

    depth: int = 6
    """ViT: transformer blocks."""

    heads: int = 4
    """ViT: attention heads; must divide dim."""

    mlp_ratio: float = 2.0
    """ViT: hidden width of the MLP as a multiple of dim."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    """CNN: output channels of the conv blocks; every block after the first halves the resolution."""

    class_names: list[str] | None = None
    """Names of the classes, in label order (documentation; None when unknown)."""

    def __post_init__(self) -> None:
        if self.architecture not in ("vit", "cnn"):
            raise ValueError(f"architecture must be 'vit' or 'cnn', got {self.architecture!r}")
        if self.architecture == "vit" and (self.image_size % self.patch_size or self.dim % self.heads):
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size} and heads "
                             f"{self.heads} must divide dim {self.dim}")


def _init_linear(module: nn.Linear) -> nn.Linear:
    nn.init.trunc_normal_(module.weight, std=0.02)
    nn.init.zeros_(module.bias)
    return module


class VisionClassifier(nn.Module):
    """What the ViT and the CNN share: the head (built last by each, as in timm), loss, saving, loading."""

    head: nn.Linear

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config

    def pooled_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The (batch, width) features the head reads."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs) -> ImageClassifierOutput:
        """Logits (batch, num_classes), and the mean cross-entropy when `labels` (batch,) is given.

        Other keyword arguments (`return_dict`, ...) are accepted and ignored, so generic training code
        can pass what it passes to transformers classifiers.
        """
        logits = self.head(self.pooled_features(pixel_values))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device).long())
        return ImageClassifierOutput(loss=loss, logits=logits)

    def replace_head(self, num_classes: int | None = None) -> None:
        """A freshly initialised head with `num_classes` outputs (default: as many as now), for transfer."""
        num_classes = num_classes or self.config.num_classes
        head = _init_linear(nn.Linear(self.head.in_features, num_classes))
        self.head = head.to(device=self.head.weight.device, dtype=self.head.weight.dtype)
        if num_classes != self.config.num_classes:
            self.config.class_names = None
        self.config.num_classes = num_classes

    def save_pretrained(self, directory: str | os.PathLike, metadata: dict | None = None) -> None:
        """`peftkit_vision.json` (config, plus `metadata` such as pretraining figures) and `model.safetensors`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS_FILE)
        doc = {"config": asdict(self.config), **({"metadata": metadata} if metadata else {})}
        (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> VisionClassifier:
        """Read what `save_pretrained` wrote (strict: every tensor must fit)."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE}: not a saved peftkit vision model")
        config = VisionConfig(**json.loads((directory / CONFIG_FILE).read_text())["config"])
        with torch.device("meta"):  # no random init to overwrite (and no draws from the global RNG)
            model = build_vision_model(config)
        if cls is not VisionClassifier and not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {config.architecture!r} model, not a {cls.__name__}")
        model.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=True, assign=True)
        model.config._name_or_path = str(directory)  # what saved adapters record as their base
        return model.to(dtype).eval()


class Attention(nn.Module):
    """Multi-head self-attention from one `qkv` linear and an output `proj` linear (timm's layout)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (batch, heads, tokens, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (batch, heads, tokens, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a Conv2d with kernel = stride = patch size."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (batch, patches, dim)


class ViT(VisionClassifier):
    """A small Vision Transformer classifying by its class token (see the module docstring)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = PatchEmbed(config.in_channels, config.dim, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, config.dim))
        self.blocks = nn.Sequential(*(Block(config.dim, config.heads, config.mlp_ratio) for _ in range(config.depth)))
        self.norm = nn.LayerNorm(config.dim)
        self.head = _init_linear(nn.Linear(config.dim, config.num_classes))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised tokens after the last block: (batch, 1 + patches, dim), class token first."""
        x = self.patch_embed(pixel_values)  # (batch, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def pooled_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_features(pixel_values)[:, 0]


class ConvBlock(nn.Module):
    """3x3 conv -> GroupNorm -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(max(1, out_channels // 8), out_channels)  # groups of 8 channels
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class CNN(VisionClassifier):
    """Conv blocks (the first keeps the resolution, each later one halves it), global mean pool, head."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        widths = [config.in_channels, *config.channels]
        self.blocks = nn.Sequential(*(ConvBlock(widths[i], widths[i + 1], 1 if i == 0 else 2)
                                      for i in range(len(config.channels))))
        self.head = _init_linear(nn.Linear(config.channels[-1], config.num_classes))

    def pooled_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.blocks(pixel_values).mean(dim=(2, 3))  # (batch, channels[-1])


def build_vision_model(config: VisionConfig) -> VisionClassifier:
    """A randomly initialised ViT or CNN for `config.architecture`."""
    return (ViT if config.architecture == "vit" else CNN)(config)


def builtin_path(name: str) -> Path:
    """The directory of a shipped checkpoint ("vit-fmnist" or "cnn-fmnist")."""
    if name not in BUILTINS:
        raise ValueError(f"no built-in vision model {name!r}; choose one of {', '.join(BUILTINS)}")
    return ASSETS / name


def is_vision_model_dir(name_or_path: str | os.PathLike) -> bool:
    """True for a built-in vision name or a directory that `save_pretrained` wrote."""
    return str(name_or_path) in BUILTINS or (Path(name_or_path) / CONFIG_FILE).is_file()


def load_vision_model(name_or_path: str | os.PathLike, num_classes: int | None = None,
                      dtype: torch.dtype = torch.float32) -> VisionClassifier:
    """A vision model ready to adapt.

    A built-in name ("vit-fmnist", "cnn-fmnist") gives the pretrained body with a freshly
    initialised head of `num_classes` (default 10): the Fashion-MNIST head is no use for another
    task. A directory gives the model as saved, its head replaced only when `num_classes` differs.
    """
    builtin = str(name_or_path) in BUILTINS
    model = VisionClassifier.from_pretrained(builtin_path(str(name_or_path)) if builtin else name_or_path, dtype)
    if builtin or (num_classes and num_classes != model.config.num_classes):
        model.replace_head(num_classes)
    if builtin:
        model.config._name_or_path = str(name_or_path)  # adapters name the built-in, not a site-packages path
    return model
