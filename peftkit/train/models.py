"""Models to fine-tune: the offline built-ins ("minilm", "smollm2") or any transformers checkpoint.

all-MiniLM-L6-v2 was trained for mean pooling: behind the stock `AutoModelForSequenceClassification`
head (CLS token and a stale pooler), LoRA on query/value stayed at the majority-class rate in a
64-step run, while a fresh linear head over the attention-masked mean of the last hidden states
learns normally. `MeanPoolingClassifier` is that head.

Vision models (task "image-classification") are the project's own small ViT and CNN, pretrained on
Fashion-MNIST and shipped in the package; they live in `vision.py` and have no tokenizer (None).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import SequenceClassifierOutput

from . import assets
from .vision import BUILTINS as VISION_BUILTINS
from .vision import is_vision_model_dir, load_vision_model

TASKS = ("classification", "causal-lm", "image-classification")
HEAD_FILE = "classifier.safetensors"  # marks a saved MeanPoolingClassifier directory


class MeanPoolingClassifier(nn.Module):
    """An encoder, the masked mean of its last hidden states, and a fresh linear head `classifier`.

        pooled = sum_t m_t h_t / sum_t m_t,   logits = W pooled + b

    A soft prompt method calls `forward` with `inputs_embeds` and an attention mask lengthened by the
    prompt; the mean then includes the prompt positions, which is intended (they carry the task).

    Attributes:
        encoder: the transformers encoder (e.g. `BertModel` without its pooler).
        classifier: `nn.Linear(hidden_size, num_labels)`.
        config: the encoder's config (peftkit and transformers utilities read it).
    """

    def __init__(self, encoder: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.num_labels = num_labels
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def get_input_embeddings(self) -> nn.Module:
        """The encoder's token embedding (the module a soft prompt method wraps)."""
        return self.encoder.get_input_embeddings()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The encoder as a transformers directory plus `classifier.safetensors` (what `load_model` reads)."""
        directory = Path(directory)
        self.encoder.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, directory / HEAD_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MeanPoolingClassifier:
        """Read what `save_pretrained` wrote."""
        from transformers import AutoModel

        head = load_file(Path(directory) / HEAD_FILE)
        model = cls(AutoModel.from_pretrained(directory, dtype=dtype), num_labels=head["weight"].shape[0])
        model.classifier.load_state_dict(head)
        return model.to(dtype)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        """Logits (batch, num_labels), and the mean cross-entropy when `labels` (batch,) is given.

        Other keyword arguments (`return_dict`, `output_attentions`, ...) are accepted and ignored,
        so generic training code can pass what it passes to transformers classifiers.
        """
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           token_type_ids=token_type_ids)
        hidden = out.last_hidden_state  # (batch, seq, hidden)
        if attention_mask is None:
            mask = hidden.new_ones(hidden.shape[:2])
        else:
            mask = attention_mask.to(hidden.dtype)
        mask = mask.unsqueeze(-1)  # (batch, seq, 1)
        # clamp: an all-padding row pools to zeros instead of NaN
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (batch, hidden)
        logits = self.classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device).long())
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_model(name_or_path: str, task: str, num_labels: int | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """A model and its tokenizer, ready to adapt.

    Built-in names load from the offline asset packages and never touch the network:

    * "minilm" (task "classification"): `MeanPoolingClassifier` over all-MiniLM-L6-v2's `BertModel`
      (the unused pooler is dropped so that adapters targeting "dense" do not land in dead weights).
    * "smollm2" (task "causal-lm"): SmolLM2-135M-Instruct as `LlamaForCausalLM`, from the cached
      checkpoint of `assets.smollm2_path()` (converted from the GGUF on first use, about 20 s).
    * "vit-fmnist", "cnn-fmnist" (task "image-classification"): the project's ViT / CNN pretrained
      on Fashion-MNIST, with a freshly initialised head (`vision.load_vision_model`);
      a directory that `VisionClassifier.save_pretrained` wrote loads likewise. No tokenizer: None.

    Anything else is a local directory or a Hub name loaded with `AutoModelForSequenceClassification`
    ("classification", fresh head of `num_labels`) or `AutoModelForCausalLM` ("causal-lm").
    A tokenizer without a pad token gets its EOS token as pad token.

    Args:
        name_or_path: "minilm", "smollm2", "vit-fmnist", "cnn-fmnist", a directory or a Hub model name.
        task: "classification", "causal-lm" or "image-classification".
        num_labels: classes of the classification head; None: 2 for text, and for vision the
            built-in's 10 or a saved directory's own.
        dtype: parameter dtype (float32 for training on CPU).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    builtin_task = {"minilm": "classification", "smollm2": "causal-lm",
                    **dict.fromkeys(VISION_BUILTINS, "image-classification")}.get(name_or_path)
    if builtin_task is not None and task != builtin_task:
        raise ValueError(f"built-in model {name_or_path!r} supports task {builtin_task!r}, not {task!r}")
    if task == "image-classification":
        if not is_vision_model_dir(name_or_path):
            raise ValueError(f"task 'image-classification' needs a peftkit vision model ({', '.join(VISION_BUILTINS)} "
                             f"or a directory it saved); got {name_or_path!r}")
        return load_vision_model(name_or_path, num_classes=num_labels, dtype=dtype), None
    if name_or_path == "minilm":
        model, tokenizer = _load_minilm(num_labels or 2, dtype)
    elif (Path(name_or_path) / HEAD_FILE).is_file():  # a merged MiniLM classifier that peftkit saved
        from transformers import AutoTokenizer

        model = MeanPoolingClassifier.from_pretrained(name_or_path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    else:
        model, tokenizer = _load_auto(name_or_path, task, num_labels or 2, dtype)
    if builtin_task is not None:
        model.config._name_or_path = name_or_path  # saved adapters name the built-in, not a site-packages path
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only tokenizers often have no pad token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last token by it
    return model, tokenizer


def _load_minilm(num_labels: int, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoTokenizer, BertModel

    path = assets.minilm_path()
    encoder = BertModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    encoder.pooler = None  # unused by mean pooling; dropped after loading, so no unexpected-key report
    model = MeanPoolingClassifier(encoder, num_labels).to(dtype)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_auto(name_or_path: str, task: str, num_labels: int, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    local = name_or_path == "smollm2"
    path = assets.smollm2_path() if local else name_or_path
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=local)
