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
    if kind == "t5":  # encoder-decoder: the decoder reads the same tokens
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output_of(model, inputs: dict) -> torch.Tensor:
    """The model's main output tensor (logits for transformers models)."""
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# --- more architectures (issue 13): 2 layers, width 32, 4 heads of 8 (2 key/value heads where the family has
# grouped-query attention), vocabulary 100, 128 positions; each builds in well under a second ------------------
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "vocab_size": 100, "max_position_embeddings": 128}


_TOKENS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
"""Special tokens inside the tiny vocabulary (the defaults of some families point past it, and transformers warns)."""


def _build(model_cls, cfg, seed: int):
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


def tiny_gpt_neox(seed: int = 0):
    """GPT-NeoX / Pythia: fused `attention.query_key_value`, interleaved per head [q_h, k_h, v_h]."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return _build(GPTNeoXForCausalLM, GPTNeoXConfig(**_SMALL, **_TOKENS, tie_word_embeddings=False), seed)


def tiny_phi3(seed: int = 0):
    """Phi-3: fused `qkv_proj` (4 query, 2 key/value heads: q | k | v) and `gate_up_proj`."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return _build(Phi3ForCausalLM, Phi3Config(**_SMALL, **_TOKENS, num_key_value_heads=2, tie_word_embeddings=False), seed)


def tiny_qwen2(seed: int = 0):
    """Qwen2: Llama-style names, grouped-query attention, biases on q/k/v."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(Qwen2ForCausalLM, Qwen2Config(**_SMALL, num_key_value_heads=2, tie_word_embeddings=False), seed)


def tiny_gemma2(seed: int = 0):
    """Gemma 2: Llama-style names, scaled embeddings, four norms per block, soft-capped logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(**_SMALL, num_key_value_heads=2, head_dim=8, sliding_window=16)
    return _build(Gemma2ForCausalLM, cfg, seed)


def tiny_opt(seed: int = 0):
    """OPT: `self_attn.out_proj`, `fc1`/`fc2` directly in the layer, learned positions with an offset of 2."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                    max_position_embeddings=128, word_embed_proj_dim=32)
    return _build(OPTForCausalLM, cfg, seed)


def tiny_bloom(seed: int = 0):
    """BLOOM: fused `self_attention.query_key_value` interleaved per head, ALiBi (no position embeddings)."""
    from transformers import BloomConfig, BloomForCausalLM

    return _build(BloomForCausalLM, BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=100), seed)


def tiny_falcon(seed: int = 0, new_decoder_architecture: bool = False):
    """Falcon: fused `query_key_value`, multi-query (q | k | v, one key/value head) or grouped (new architecture)."""
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                       new_decoder_architecture=new_decoder_architecture, num_kv_heads=2)
    return _build(FalconForCausalLM, cfg, seed)


def tiny_roberta(seed: int = 0):
    """RoBERTa: BERT names, positions counted from padding_idx + 1 (126 usable of 128)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return _build(RobertaForSequenceClassification, RobertaConfig(**_SMALL, num_labels=2), seed)


def tiny_deberta_v2(seed: int = 0):
    """DeBERTa-v2: `query_proj`/`key_proj`/`value_proj`, relative attention, no absolute positions."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    cfg = DebertaV2Config(**_SMALL, num_labels=2, relative_attention=True, position_biased_input=False,
                          pos_att_type=["p2c", "c2p"])
    return _build(DebertaV2ForSequenceClassification, cfg, seed)


def tiny_t5(seed: int = 0):
    """T5: encoder-decoder, `SelfAttention.q/k/v/o`, `DenseReluDense.wi/wo`, relative position buckets."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=100)
    return _build(T5ForConditionalGeneration, cfg, seed)


ARCHITECTURES = {"gpt_neox": tiny_gpt_neox, "phi3": tiny_phi3, "qwen2": tiny_qwen2, "gemma2": tiny_gemma2,
                 "opt": tiny_opt, "bloom": tiny_bloom, "falcon": tiny_falcon, "roberta": tiny_roberta,
                 "deberta_v2": tiny_deberta_v2, "t5": tiny_t5}
"""The families added for issue 13, by name; `MODELS` holds them too."""
MODELS.update(ARCHITECTURES)
