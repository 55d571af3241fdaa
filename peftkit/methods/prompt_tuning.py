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

from ..core.config import AdapterConfig, ConfigError
from ..core.registry import register, register_model_adapter
from .lora import adapter_dtype
from .soft_prompt import PromptSplice, SoftPromptLayer, init_rows


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


class PromptEmbedding(SoftPromptLayer):
    """Holds the soft prompt on the input embeddings; the model's pre-hook (soft_prompt.py) splices it in."""

    def __init__(self, base: nn.Embedding, cfg: PromptTuningConfig) -> None:
        super().__init__(base, cfg.num_virtual_tokens)
        self.cfg = cfg
        w = base.weight
        self.prompt = nn.Parameter(torch.zeros(cfg.num_virtual_tokens, w.shape[1], device=w.device,
                                               dtype=adapter_dtype(w)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        self.prompt.copy_(init_rows(self.base.weight, self.prompt.shape[0], cfg.init, cfg.seed, cfg.init_text,
                                    cfg.tokenizer))

    def soft_prompt(self) -> torch.Tensor:
        return self.prompt


register_model_adapter(PromptTuningConfig)(PromptSplice)


@register(PromptTuningConfig)
def build(module: nn.Module, cfg: PromptTuningConfig, name: str) -> PromptEmbedding | None:
    """Wrap the input embedding module."""
    if not isinstance(module, nn.Embedding):
        return None
    return PromptEmbedding(module, cfg)
