"""Tiny models the tests share: built from configs, random weights, seconds to run on a CPU."""

from __future__ import annotations

import torch
import torch.nn as nn


class MLP(nn.Module):
    """Linear(16,32)-ReLU-Linear(32,16)-ReLU-Linear(16,4), the toy model of methods.md."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class SmallCNN(nn.Module):
    """Two Conv2d layers and a linear head on 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=100, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def tiny_vit(seed: int = 0):
    """peftkit's ViT (timm names: blocks.{i}.attn.qkv/proj, mlp.fc1/fc2, norm1/2, patch_embed.proj, head)."""
    from peftkit.train.vision import VisionConfig, ViT

    torch.manual_seed(seed)
    return ViT(VisionConfig(patch_size=7, dim=16, depth=2, heads=2, num_classes=4)).eval()


def mlp(seed: int = 0):
    torch.manual_seed(seed)
    return MLP().eval()


def cnn(seed: int = 0):
    torch.manual_seed(seed)
    return SmallCNN().eval()


MODELS = {"mlp": mlp, "llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2, "cnn": cnn, "vit": tiny_vit}


def example_inputs(kind: str, batch: int = 2, seq: int = 6, seed: int = 1) -> dict:
    """Keyword inputs for a model kind."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(batch, 16, generator=g)}
    if kind == "cnn":
        return {"x": torch.randn(batch, 1, 8, 8, generator=g)}
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 1, 28, 28, generator=g)}
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output_of(model, inputs: dict) -> torch.Tensor:
    """The model's main output tensor (logits for transformers models)."""
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits
