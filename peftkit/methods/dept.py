"""DePT: decomposed prompt tuning, a short soft prompt plus a low-rank update of the input embeddings
(Shi & Lipani, 2023, arXiv:2309.05173).

    E'[p] = E(input_ids)[p] + (alpha / sqrt(r)) (A B)[p]   for positions p < s,
    inputs_embeds = [P ; E'],   labels = [-100_m ; labels],

with P in R^{m x d} (init "vocab", "random" or "text", as prompt tuning), A in R^{s x r}
kaiming_uniform(a=sqrt(5)), B in R^{r x d} zero, so at init DePT is prompt tuning with m tokens (and
the base model itself when m = 0). Note the scale alpha / sqrt(r), not alpha / r.
Trainable: m d + s r + r d, chosen equal to a prompt of l tokens (l d): for T5-base (d = 768,
s = 256) l = 100 gives 76,800 = DePT m = 60, r = 30. The sequence is l - m tokens shorter.

Positions: the reference pads (and truncates) every input to s = max_length and adds the whole
(s, d) update, so it only runs on inputs of exactly s tokens. Here the update is added by position:
the real token at position p (0-based, after the prompt) gets row p of A B, positions from s on get
none; on inputs padded to s (on the right, as the reference does) that is the reference exactly,
and shorter inputs and `generate` (one new token per step, position = cache length - m) work too.
Inputs longer than s are not an error: their tokens past s are unchanged. On a model with absolute
position embeddings (GPT-2, BERT, OPT ...), `apply` refuses m + s beyond its positions, and a forward whose
prompt + tokens overrun them raises a ConfigError naming the lengths (soft_prompt.check_length).

Two learning rates (the paper trains P and A, B with different ones): `prompt_lr` and
`embedding_lr` (None: the training lr). `DePTSplice.learning_rates` states them, which
`peftkit.core.params.param_groups(model, lr)` turns into optimizer parameter groups; peftkit's
training loop uses them by itself. Not mergeable (P lengthens the input; A B is per position, not
per token, so it cannot fold into the vocabulary table). Hugging Face peft has no DePT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import AdapterConfig, ConfigError
from ..core.registry import register, register_model_adapter
from .lora import adapter_dtype
from .soft_prompt import PromptSplice, SoftPromptLayer, init_rows


@dataclass
class DePTConfig(AdapterConfig):
    """A soft prompt of m tokens plus a rank-r update of the first s input embeddings."""

    method = "dept"
    paper: ClassVar[str] = "Shi & Lipani 2023, arXiv:2309.05173"
    trainable: ClassVar[str] = "m d + s r + r d (m prompt tokens, A: s x r, B: r x d)"

    targets: str | list[str] | None = "input-embeddings"
    """The input embedding module (found through get_input_embeddings())."""

    num_virtual_tokens: int = 60
    """Prompt length m (the paper's T5-base setting with r = 30; 0 leaves only the embedding update)."""

    r: int = 30
    """Rank of the embedding update A B."""

    alpha: float = 8.0
    """Update scale alpha; the update is multiplied by alpha / sqrt(r) (the reference's lora_alpha default)."""

    max_length: int = 256
    """s: positions that get an update (the reference pads every input to this length)."""

    prompt_lr: float | None = None
    """Learning rate of the prompt P (the paper: 3e-1 or 4e-1); None: the training lr."""

    embedding_lr: float | None = None
    """Learning rate of A and B (the paper: 5e-3 to 5e-4); None: the training lr."""

    init: str = "vocab"
    """Prompt init: "vocab" (embeddings of random tokens), "random" (N(0, 1)) or "text" (init_text)."""

    init_text: str = ""
    """Text whose token embeddings initialise the prompt (init="text"), repeated to m tokens."""

    tokenizer: str = ""
    """Tokenizer name or path used to tokenize init_text."""

    seed: int = 0
    """Seed of the prompt init and of A's init."""

    def validate(self) -> None:
        for name, low in (("num_virtual_tokens", 0), ("r", 1), ("max_length", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.r > self.max_length:
            raise ConfigError(f"r={self.r} exceeds max_length={self.max_length}: A (s x r) would have more "
                              "columns than rows; use r <= max_length")
        for name in ("prompt_lr", "embedding_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"{name} must be a positive number or None (the training lr), got {value!r}")
        if self.init not in ("vocab", "random", "text"):
            raise ConfigError(f"unknown prompt init {self.init!r}; choose vocab, random or text")
        if self.init == "text" and not (self.init_text and self.tokenizer):
            raise ConfigError("init='text' needs init_text and tokenizer")


def param_count(d: int, m: int, r: int, s: int) -> int:
    """DePT's trainable count m d + s r + r d (model width d, prompt length m, rank r, max length s)."""
    return m * d + s * r + r * d


class DePTEmbedding(SoftPromptLayer):
    """Holds P, A and B on the input embeddings; the model's pre-hook prepends P and adds A B."""

    def __init__(self, base: nn.Embedding, cfg: DePTConfig) -> None:
        super().__init__(base, cfg.num_virtual_tokens)
        self.cfg = cfg
        w = base.weight
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.scaling = cfg.alpha / math.sqrt(cfg.r)
        self.prompt = nn.Parameter(torch.zeros(cfg.num_virtual_tokens, w.shape[1], **kw))
        self.lora_embedding_A = nn.Parameter(torch.zeros(cfg.max_length, cfg.r, **kw))
        self.lora_embedding_B = nn.Parameter(torch.zeros(cfg.r, w.shape[1], **kw))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        self.prompt.copy_(init_rows(self.base.weight, self.prompt.shape[0], cfg.init, cfg.seed, cfg.init_text,
                                    cfg.tokenizer))
        a = torch.empty(self.lora_embedding_A.shape)  # drawn on the CPU: the same values on every device
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(cfg.seed + 1))
        self.lora_embedding_A.copy_(a)
        self.lora_embedding_B.zero_()

    def soft_prompt(self) -> torch.Tensor:
        return self.prompt

    def adjust_embeddings(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """E + (alpha / sqrt(r)) (A B)[start : start + seq], positions from s on unchanged."""
        seq, s = embeds.shape[1], self.lora_embedding_A.shape[0]
        stop = min(start + seq, s)
        if stop <= start:
            return embeds
        update = self.scaling * (self.lora_embedding_A[start:stop] @ self.lora_embedding_B)  # (stop - start, d)
        return embeds + F.pad(update, (0, 0, 0, seq - (stop - start))).to(embeds.dtype)

    def positions_needed(self) -> tuple[int, str]:
        """The prompt plus an input padded to max_length, as the reference pads it."""
        m, s = self.num_virtual_tokens, self.lora_embedding_A.shape[0]
        return m + s, f"{m} virtual tokens + max_length {s} (inputs padded to max_length, as the reference does)"



@register_model_adapter(DePTConfig)
class DePTSplice(PromptSplice):
    """The soft prompt's hook, plus DePT's two learning rates: one for the prompt, one for A and B."""

    def learning_rates(self, base_lr: float) -> dict[nn.Parameter, float]:
        layer, cfg = self.only_layer(), self.cfg
        ab = cfg.embedding_lr or base_lr
        return {layer.prompt: cfg.prompt_lr or base_lr, layer.lora_embedding_A: ab, layer.lora_embedding_B: ab}


@register(DePTConfig)
def build(module: nn.Module, cfg: DePTConfig, name: str) -> DePTEmbedding | None:
    """Wrap the input embedding module."""
    if not isinstance(module, nn.Embedding):
        return None
    return DePTEmbedding(module, cfg)
