"""Models to fine-tune: the offline built-ins ("minilm", "smollm2") or any transformers checkpoint.

all-MiniLM-L6-v2 was trained for mean pooling: behind the stock `AutoModelForSequenceClassification`
head (CLS token and a stale pooler), LoRA on query/value stayed at the majority-class rate in a
64-step run, while a fresh linear head over the attention-masked mean of the last hidden states
learns normally. `MeanPoolingClassifier` is that head.

Vision models (task "image-classification") are the project's own small ViT and CNN, pretrained on
Fashion-MNIST and shipped in the package; they live in `vision.py` and have no tokenizer (None).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import SequenceClassifierOutput

from ..core.config import ConfigError
from . import assets
from .vision import BUILTINS as VISION_BUILTINS
from .vision import is_vision_model_dir, load_vision_model

TASKS = ("classification", "causal-lm", "image-classification")
HEAD_FILE = "classifier.safetensors"  # marks a saved MeanPoolingClassifier directory
TASK_FILE = "task.json"  # written by `peftkit train` next to the adapter: task, num_labels, label_names
BUILTIN_TASKS = {"minilm": "classification", "smollm2": "causal-lm",
                 **dict.fromkeys(VISION_BUILTINS, "image-classification")}
# learned positions that start after the padding index: usable = max_position_embeddings - pad_token_id - 1
_PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                             "data2vec-text", "longformer", "mpnet", "ibert", "xmod")


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
        num_labels: classes of the classification head; None: the checkpoint's own head size (2
            for minilm and a base without a head), and for vision the built-in's 10 or a saved
            directory's own. A head of another size is created fresh.
        dtype: parameter dtype (float32 for training on CPU).

    Raises:
        ConfigError: an unknown task, a built-in asked for another task, or a model that cannot be
            loaded (no such directory, no network for a Hub name, not a transformers checkpoint).
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    builtin_task = BUILTIN_TASKS.get(name_or_path)
    if builtin_task is not None and task != builtin_task:
        raise ConfigError(f"built-in model {name_or_path!r} supports task {builtin_task!r}, not {task!r}")
    if task == "image-classification":
        if not is_vision_model_dir(name_or_path):
            raise ConfigError(f"task 'image-classification' needs a peftkit vision model ({', '.join(VISION_BUILTINS)} "
                             f"or a directory it saved); got {name_or_path!r}")
        return load_vision_model(name_or_path, num_classes=num_labels, dtype=dtype), None
    if name_or_path == "minilm":
        model, tokenizer = _load_minilm(num_labels or 2, dtype)
    elif (Path(name_or_path) / HEAD_FILE).is_file():  # a merged MiniLM classifier that peftkit saved
        from transformers import AutoTokenizer

        model = MeanPoolingClassifier.from_pretrained(name_or_path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    else:
        model, tokenizer = _load_auto(name_or_path, task, num_labels, dtype)
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


def _load_auto(name_or_path: str, task: str, num_labels: int | None, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    local = name_or_path == "smollm2"
    path = assets.smollm2_path() if local else name_or_path
    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local)
        else:  # a head of another size than the checkpoint's is created fresh, as for a base without one
            sized = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, **sized)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError) as err:  # no such directory, offline Hub name, unknown architecture
        where = "local directory" if Path(name_or_path).exists() else "local directory or Hub name (offline?)"
        raise ConfigError(f"could not load {name_or_path!r} as a {task} model from this {where}: "
                          f"{str(err).splitlines()[0]}; built-ins: {', '.join(BUILTIN_TASKS)}") from err
    return model, tokenizer


def head_size(model: nn.Module) -> int | None:
    """The classes of a sequence classifier's head (MeanPoolingClassifier or transformers'), else None."""
    return getattr(model, "num_labels", None) or getattr(getattr(model, "config", None), "num_labels", None)


def max_positions(model: nn.Module, tokenizer=None) -> tuple[int, str] | None:
    """(tokens the model can read, where that figure came from), or None for models without a limit.

    Learned position tables (BERT, GPT-2, OPT) fail with an index error past their end; the config
    says how long they are. RoBERTa-style tables start after the padding index, so two rows fewer
    are usable. Without a config figure (relative positions, as in T5) the tokenizer's
    `model_max_length` is used when it is a real limit (it is 1e30 when unknown).
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", "") in _PADDING_OFFSET_POSITIONS:
                pad = getattr(config, "pad_token_id", None)
                value -= (1 if pad is None else pad) + 1
                return value, f"config.{name} less the padding offset"
            return value, f"config.{name}"
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit, "tokenizer.model_max_length"
    return None


def saved_task(adapter_dir: str | os.PathLike) -> dict | None:
    """The `task.json` a run wrote next to its adapter ({"task", "num_labels", "label_names"}), or None."""
    path = Path(adapter_dir) / TASK_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); delete it and pass --task") from err
    if not isinstance(info, dict) or info.get("task") not in TASKS:
        raise ConfigError(f"{path} names no task of {', '.join(TASKS)}; delete it and pass --task")
    return info


def base_task(name_or_path: str) -> str | None:
    """The task a base model was built for, when it can be told without loading it; else None.

    Built-in names know theirs; a peftkit vision or MiniLM-classifier directory is a classifier;
    a transformers directory says so in `config.json`'s `architectures` (`*ForSequenceClassification`
    is classification, `*ForCausalLM` / `*LMHeadModel` causal LM).
    """
    if name_or_path in BUILTIN_TASKS:
        return BUILTIN_TASKS[name_or_path]
    if is_vision_model_dir(name_or_path):
        return "image-classification"
    path = Path(name_or_path)
    if (path / HEAD_FILE).is_file():
        return "classification"
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    kinds = {"classification" if a.endswith("ForSequenceClassification") else
             "causal-lm" if a.endswith(("ForCausalLM", "LMHeadModel")) else None for a in architectures}
    kinds.discard(None)
    return kinds.pop() if len(kinds) == 1 else None
