"""P-tuning: a soft prompt produced by a small encoder from n learned inputs (Liu et al., 2021, "GPT
understands, too", arXiv:2103.10385); Hugging Face peft calls it P_TUNING (`PromptEncoder`).

    P = f(E),  E in R^{n x d} trained,  inputs_embeds = [P ; E(input_ids)],

with f one of peft's two encoders (h = `encoder_hidden`, d the model's width):

* "mlp":  Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d);
  trainable n d + (d h + h) + (h h + h) + (h d + d);
* "lstm": a bidirectional LSTM (`encoder_layers` layers, hidden h) -> Linear(2h, 2h) -> ReLU -> Linear(2h, d);
  trainable n d + 2 sum_layers 4h (in + h + 2) + (2h 2h + 2h) + (2h d + d), in = d then 2h.

The prompt is prepended as in prompt tuning (soft_prompt.py: attention mask and labels padded,
`generate` works). Not mergeable. Inits as peft: E ~ N(0, 1), the encoder's layers PyTorch's default
init, all drawn from `seed`. Defaults: the MLP encoder (peft's recommendation) and h = d (peft's).

peft saves only the encoder's output P (its `prompt_embeddings`); a peft export does the same, so it
loads in peft (inference) and back in peftkit as prompt tuning with that prompt. A P_TUNING file
written by peft likewise loads as prompt tuning: the encoder that produced P is not in the file.
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
class PTuningConfig(AdapterConfig):
    """A soft prompt made by an MLP or LSTM encoder from n learned input vectors."""

    method = "p-tuning"
    paper: ClassVar[str] = "Liu et al. 2021, arXiv:2103.10385"
    trainable: ClassVar[str] = "n d + encoder (MLP: d h + h + h h + h + h d + d)"

    targets: str | list[str] | None = "input-embeddings"
    """The input embedding module (found through get_input_embeddings())."""

    num_virtual_tokens: int = 20
    """Number of prompt tokens n."""

    encoder: str = "mlp"
    """"mlp" (three linear layers) or "lstm" (bidirectional LSTM and a two-layer MLP head)."""

    encoder_hidden: int | None = None
    """Hidden width h of the encoder; None: the model's hidden size d."""

    encoder_layers: int = 2
    """LSTM layers (the MLP always has three linear layers, as in peft)."""

    encoder_dropout: float = 0.0
    """Dropout between LSTM layers."""

    seed: int = 0
    """Seed of the inputs' N(0, 1) init and of the encoder's initialisation."""

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.encoder not in ("mlp", "lstm"):
            raise ConfigError(f"unknown P-tuning encoder {self.encoder!r}; choose mlp or lstm")
        if self.encoder_hidden is not None and (not isinstance(self.encoder_hidden, int) or self.encoder_hidden < 1):
            raise ConfigError(f"encoder_hidden must be a positive integer or None, got {self.encoder_hidden!r}")
        if not isinstance(self.encoder_layers, int) or self.encoder_layers < 1:
            raise ConfigError(f"encoder_layers must be a positive integer, got {self.encoder_layers!r}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


class PromptEncoderLayer(SoftPromptLayer):
    """Holds the encoder's inputs E and the encoder on the input embeddings; P = encoder(E)."""

    def __init__(self, base: nn.Embedding, cfg: PTuningConfig) -> None:
        super().__init__(base, cfg.num_virtual_tokens)
        self.cfg = cfg
        w = base.weight
        d, h = w.shape[1], cfg.encoder_hidden or w.shape[1]
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.inputs = nn.Parameter(torch.zeros(cfg.num_virtual_tokens, d, **kw))
        if cfg.encoder == "lstm":
            self.lstm = nn.LSTM(d, h, num_layers=cfg.encoder_layers, dropout=cfg.encoder_dropout,
                                bidirectional=True, batch_first=True, **kw)
            self.head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))
        else:
            self.lstm = None
            self.head = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                      nn.Linear(h, d, **kw))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n, seed = self.inputs.shape[0], self.cfg.seed
        self.inputs.copy_(init_rows(self.base.weight, n, "random", seed))
        with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's random stream
            torch.manual_seed(seed)
            for module in (self.lstm, *self.head):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def soft_prompt(self) -> torch.Tensor:
        if self.lstm is None:
            return self.head(self.inputs)
        # the LSTM runs in its own dtype, outside autocast: oneDNN has no bf16 LSTM on CPUs without AVX-512
        # ("could not create a primitive descriptor"), and this encoder of n vectors costs nothing next to the model
        with torch.autocast(self.inputs.device.type, enabled=False):
            encoded = self.lstm(self.inputs.unsqueeze(0))[0][0]  # (1, n, 2h) -> (n, 2h)
        return self.head(encoded)  # (n, d)


register_model_adapter(PTuningConfig)(PromptSplice)


@register(PTuningConfig)
def build(module: nn.Module, cfg: PTuningConfig, name: str) -> PromptEncoderLayer | None:
    """Wrap the input embedding module."""
    if not isinstance(module, nn.Embedding):
        return None
    return PromptEncoderLayer(module, cfg)
