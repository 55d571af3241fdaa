"""Prompt tuning: n trainable soft tokens prepended to the input embeddings (Lester et al., 2021,
arXiv:2104.08691).

    inputs_embeds = [P ; E(input_ids)],   P in R^{n x d},

with the attention mask padded by n ones, labels by n values of -100 and token_type_ids by zeros.
The layer wraps the model's input embedding module (it owns P); the forward pre-hook on the model
that rewrites the call's arguments is shared with P-tuning and DePT (soft_prompt.py). Nothing else
changes, so `generate` works: the prompt goes in on the first step, later steps (with a non-empty
cache) only get the padded mask. Not mergeable (the sequence gets longer). Trainable: n * d.

Inits (`PromptTuningConfig.init`): "vocab" copies the embeddings of random vocabulary tokens (the
sampled-vocabulary init of the paper, which trains far better than N(0, 1) at small budgets);
"random" is peft's N(0, 1); "text" uses the embeddings of `init_text` tokenized with `tokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import peft_format
from ..core.apply import get_state
from ..core.config import AdapterConfig, ConfigError
from ..core.registry import register
from .lora import adapter_dtype
from .soft_prompt import SoftPromptLayer, init_rows


@dataclass
class PromptTuningConfig(AdapterConfig):
    """Soft prompt tokens prepended to the input embeddings."""

    method = "prompt-tuning"
    paper: ClassVar[str] = "Lester et al. 2021, arXiv:2104.08691"
    trainable: ClassVar[str] = "n d (n soft tokens of width d)"

    targets: str | list[str] | None = "input-embeddings"
    """The input embedding module (found through get_input_embeddings())."""

    num_virtual_tokens: int = 20
    """Number of soft prompt tokens n."""

    init: str = "vocab"
    """"vocab" (embeddings of random tokens), "random" (N(0, 1)) or "text" (embeddings of init_text)."""

    init_text: str = ""
    """Text whose token embeddings initialise the prompt (init="text"), repeated to n tokens."""

    tokenizer: str = ""
    """Tokenizer name or path used to tokenize init_text."""

    seed: int = 0
    """Seed of the "vocab" and "random" inits."""

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 0:
            raise ConfigError(f"num_virtual_tokens must be a non-negative integer, got {self.num_virtual_tokens}")
        if self.init not in ("vocab", "random", "text"):
            raise ConfigError(f"unknown prompt init {self.init!r}; choose vocab, random or text")
        if self.init == "text" and not (self.init_text and self.tokenizer):
            raise ConfigError("init='text' needs init_text and tokenizer")

    # --- Hugging Face peft interop (key names live in core/peft_format.py) ---
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def to_peft_config(self, model: nn.Module) -> dict:
        """peft's PromptTuningConfig fields for this adapter on `model`.

        peft needs the task type to pick the model class that prepends the prompt; the init is
        written as SAMPLE_VOCAB or RANDOM (a TEXT init would make peft download the tokenizer at
        load time only to overwrite the result with the saved prompt).
        """
        common = peft_format.common_fields(model, self, self.peft_type)
        if common["task_type"] is None:
            raise ConfigError(f"peft's prompt tuning needs a task type, and peftkit cannot tell it from "
                              f"{type(model).__name__}; supported: model classes ending in "
                              f"{', '.join(peft_format.TASK_TYPES)}")
        config = getattr(model, "config", None)
        (layer_name,) = get_state(model).adapted
        return {
            **common, "num_virtual_tokens": self.num_virtual_tokens, "num_transformer_submodules": 1,
            "token_dim": get_state(model).layers[layer_name].prompt.shape[1],
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_layers": getattr(config, "num_hidden_layers", None),
            "prompt_tuning_init": "SAMPLE_VOCAB" if self.init == "vocab" else "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        }

    @classmethod
    def from_peft_config(cls, data: dict, model: nn.Module | None = None) -> PromptTuningConfig:
        """The config for a peft PromptTuningConfig dict (decoder-only and encoder-only models)."""
        used = ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "prompt_tuning_init",
                "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs", "modules_to_save")
        peft_format.check_fields(data, cls, used, {"num_transformer_submodules": 1})
        if data.get("task_type") == "SEQ_2_SEQ_LM":
            raise ConfigError("peftkit's prompt tuning prepends to one input sequence; peft's SEQ_2_SEQ_LM "
                              "prompt tuning (encoder and decoder prompts) is not supported")
        init = {"TEXT": "text", "SAMPLE_VOCAB": "vocab"}.get(data.get("prompt_tuning_init"), "random")
        text, tokenizer = data.get("prompt_tuning_init_text") or "", data.get("tokenizer_name_or_path") or ""
        if init == "text" and not (text and tokenizer):
            init = "random"  # the weights come from the file; the init only matters for training from scratch
        return cls(num_virtual_tokens=data.get("num_virtual_tokens"), init=init, init_text=text, tokenizer=tokenizer,
                   modules_to_save=peft_format.peft_saved_modules(data))


class PromptEmbedding(SoftPromptLayer):
    """Holds the soft prompt on the input embeddings; the model's pre-hook (soft_prompt.py) splices it in."""

    peft_names = {"prompt": "prompt_embeddings"}

    def __init__(self, base: nn.Embedding, cfg: PromptTuningConfig) -> None:
        super().__init__(base, cfg.num_virtual_tokens)
        self.cfg = cfg
        w = base.weight
        self.prompt = nn.Parameter(torch.zeros(cfg.num_virtual_tokens, w.shape[1], device=w.device,
                                               dtype=adapter_dtype(w)))

    def peft_key(self, module_name: str, local: str) -> str:
        return "prompt_embeddings"  # peft stores prompt learning weights without a module path

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        self.prompt.copy_(init_rows(self.base.weight, self.prompt.shape[0], cfg.init, cfg.seed, cfg.init_text,
                                    cfg.tokenizer))

    def soft_prompt(self) -> torch.Tensor:
        return self.prompt


@register(PromptTuningConfig)
def build(module: nn.Module, cfg: PromptTuningConfig, name: str) -> PromptEmbedding | None:
    """Wrap the input embedding module."""
    if not isinstance(module, nn.Embedding):
        return None
    return PromptEmbedding(module, cfg)
