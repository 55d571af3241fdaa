"""Machinery the soft-prompt methods share (prompt tuning, P-tuning, DePT, prefix tuning); no method here.

A soft prompt of n vectors is spliced into a transformers model by a forward pre-hook on the model
that rewrites the call's keyword arguments, so the user's model, `generate` and HF `Trainer` keep
working unchanged:

    inputs_embeds = [P ; E(input_ids)]   (first step only: later decoding steps find P in the KV cache)
    attention_mask = [1_n ; mask],  labels = [-100_n ; labels],  token_type_ids = [0_n ; ids]

`SoftPromptLayer` wraps the input embedding module (it owns the prompt's parameters, so adapter
files name them under the embedding) and installs that hook; a method says how its prompt is made
(`soft_prompt()`) and, for DePT, how the real tokens' embeddings change (`adjust_embeddings`).

The helpers at the bottom (`call_keywords`, `cache_in`, `cache_length`, `pad_columns`, `init_rows`,
`check_room`, `check_length`) are shared with prefix tuning, whose hook extends the KV cache instead of
the input.

Positions: the prompt takes positions, so prompt + tokens can overrun a model with learned absolute
position embeddings (GPT-2's n_positions, BERT/RoBERTa/OPT's max_position_embeddings), which failed
with an IndexError deep in the embedding. `apply` refuses a prompt that leaves no room (`check_room`),
and a forward that would overrun raises a ConfigError naming both lengths (`check_length`). Rotary and
ALiBi models have no such table: only a prompt as long as the declared max_position_embeddings is refused.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ..core.architectures import describe, position_limit
from ..core.config import ConfigError
from ..core.layer import AdapterLayer

CACHE_KEYS = ("cache", "past_key_values")
"""transformers 5 calls the KV cache `cache` (`past_key_values` is its deprecated alias)."""


class SoftPromptLayer(AdapterLayer):
    """Holds a soft prompt on the input embeddings; a pre-hook on the model prepends it to every input."""

    mergeable = False

    def __init__(self, base: nn.Module, num_virtual_tokens: int) -> None:
        super().__init__(base)
        self.num_virtual_tokens = num_virtual_tokens
        self._hook = None
        self._arg_names: list[str] = []
        self._limit: tuple[int, bool] | None = None  # (positions, absolute) of the model
        self._model = ""  # how errors name the model

    # --- what a soft-prompt method provides ---------------------------------------------------
    def soft_prompt(self) -> torch.Tensor:
        """The n prompt vectors, (n, d)."""
        raise NotImplementedError

    def adjust_embeddings(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """The real tokens' embeddings (batch, seq, d), the first at position `start`; unchanged by default."""
        return embeds

    def positions_needed(self) -> tuple[int, str]:
        """Positions the configured prompt needs at least, and why (DePT adds its max_length)."""
        return self.num_virtual_tokens + 1, ""

    # --- written once ---------------------------------------------------------------------------
    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y  # the embedding itself is unchanged; the prompt is prepended by the model's pre-hook

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        """[P ; embeds] for a batch of embeddings (batch, seq, d) -> (batch, n + seq, d)."""
        prompt = self.soft_prompt().to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([prompt, embeds], dim=1)

    def on_attach(self, root: nn.Module) -> None:
        method = getattr(getattr(self, "cfg", None), "method", type(self).__name__)
        self._limit, self._model = check_room(root, method, self.num_virtual_tokens, *self.positions_needed())
        self._arg_names = forward_arg_names(root)
        self._hook = root.register_forward_pre_hook(self._rewrite_inputs, with_kwargs=True)

    def on_detach(self, root: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _rewrite_inputs(self, root: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.enabled:
            return None
        kwargs = call_keywords(self._arg_names, args, kwargs)
        n = self.num_virtual_tokens
        past = cache_in(kwargs)
        past_length = cache_length(past)
        first_step = past_length == 0  # later steps (generate with a cache) find the prompt in the cache
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.base(ids)
        method = getattr(getattr(self, "cfg", None), "method", type(self).__name__)
        check_length(self._limit, self._model, method, n, past_length, embeds.shape[1], prompt_in_past=not first_step)
        embeds = self.adjust_embeddings(embeds, max(past_length - n, 0))
        batch = embeds.shape[0]
        kwargs["inputs_embeds"] = self.prepend(embeds) if first_step else embeds
        if first_step:
            pad_columns(kwargs, "labels", n, -100, batch)
            pad_columns(kwargs, "token_type_ids", n, 0, batch)
        pad_columns(kwargs, "attention_mask", n, 1, batch)
        if "position_ids" in kwargs:
            kwargs["position_ids"] = None  # let the model count positions over prompt + tokens
        if kwargs.get("cache_position") is not None:  # transformers < 5.20 passes it
            pos = kwargs["cache_position"] + n
            kwargs["cache_position"] = torch.cat([torch.arange(n, device=pos.device), pos]) if first_step else pos
        return (), kwargs


def forward_arg_names(module: nn.Module) -> list[str]:
    """Names of `module.forward`'s parameters in order (decorators that keep __wrapped__ are seen through)."""
    return list(inspect.signature(module.forward).parameters)


def call_keywords(names: list[str], args: tuple, kwargs: dict) -> dict:
    """A forward call's arguments all by keyword (`model(ids, mask)` -> {"input_ids": ids, ...})."""
    if not args:
        return kwargs
    return {**dict(zip(names, args, strict=False)), **kwargs}


def cache_in(kwargs: dict):
    """The KV cache a call carries under either of its names, or None."""
    for key in CACHE_KEYS:
        if kwargs.get(key) is not None:  # not `or`: an empty Cache has len() 0 and is falsy
            return kwargs[key]
    return None


def cache_length(past) -> int:
    """Tokens already in a KV cache (a transformers Cache or a legacy tuple); 0 for None."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2]) if past else 0


def pad_columns(kwargs: dict, key: str, n: int, value: int, batch: int) -> None:
    """Prepend n columns of `value` to a per-token (batch, seq) tensor argument, if the call has one."""
    tensor = kwargs.get(key)
    if tensor is not None and tensor.dim() == 2 and n:  # per-token tensors only (class labels are 1-D)
        pad = torch.full((batch, n), value, dtype=tensor.dtype, device=tensor.device)
        kwargs[key] = torch.cat([pad, tensor], dim=1)


@torch.no_grad()
def init_rows(table: torch.Tensor, n: int, init: str, seed: int, text: str = "", tokenizer: str = "") -> torch.Tensor:
    """n initial prompt vectors (n, d) in float32 from an embedding table (vocab, d).

    "vocab": the embeddings of n random vocabulary tokens (Lester et al.'s sampled-vocabulary init);
    "random": N(0, 1) (peft's default); "text": the embeddings of `text` tokenized with `tokenizer`,
    repeated to n tokens. "vocab" and "random" are drawn from a generator seeded with `seed`.
    """
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        return torch.randn(n, table.shape[1], generator=gen)
    if init == "vocab":
        ids = torch.randint(0, table.shape[0], (n,), generator=gen)
    else:
        from transformers import AutoTokenizer

        found = AutoTokenizer.from_pretrained(tokenizer)(text)["input_ids"]
        ids = torch.tensor((found * (n // max(len(found), 1) + 1))[:n])
    return table[ids.to(table.device)].float().cpu()


def check_room(root: nn.Module, method: str, n: int, needed: int, why: str = "") -> tuple[tuple[int, bool] | None, str]:
    """Refuse a prompt of n positions that leaves no room in the model; returns (limit, model description).

    `needed` positions (n + 1 by default: at least one real token) must fit a model with absolute
    position embeddings; any model refuses n >= its declared max_position_embeddings.
    """
    limit, model = position_limit(root), describe(root)
    if limit is None:
        return None, model
    positions, absolute = limit
    if n >= positions:
        raise ConfigError(f"{method}: {n} virtual tokens reach {model}'s limit of {positions} positions, leaving none "
                          f"for the input; use num_virtual_tokens well below {positions}")
    if absolute and needed > positions:
        raise ConfigError(f"{method}: {why or f'{n} virtual tokens'} need {needed} positions, more than the "
                          f"{positions} absolute positions of {model}; use fewer virtual tokens or a shorter "
                          "max_length")
    return limit, model


def check_length(limit: tuple[int, bool] | None, model: str, method: str, n: int, past: int, seq: int,
                 prompt_in_past: bool) -> None:
    """Raise a ConfigError, instead of the embedding's IndexError, when prompt + tokens overrun absolute positions.

    `past` tokens are in the KV cache already (with the prompt in them when `prompt_in_past`).
    """
    if limit is None or not limit[1]:
        return
    total = past + seq + (0 if prompt_in_past else n)
    if total > limit[0]:
        room = limit[0] - n
        raise ConfigError(f"{method}: {n} virtual tokens + {total - n} input tokens = {total} positions, but {model} "
                          f"has {limit[0]} absolute positions; truncate inputs to max_length <= {room} "
                          f"(e.g. the tokenizer's max_length, or generate fewer tokens) or use fewer virtual tokens")
