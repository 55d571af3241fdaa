"""Machinery the soft-prompt methods share (prompt tuning, P-tuning, DePT, prefix tuning); no method here.

A soft prompt of n vectors is spliced into a transformers model by a forward pre-hook on the model
that rewrites the call's keyword arguments, so the user's model, `generate` and HF `Trainer` keep
working unchanged:

    inputs_embeds = [P ; E(input_ids)]   (first step only: later decoding steps find P in the KV cache)
    attention_mask = [1_n ; mask],  labels = [-100_n ; labels],  token_type_ids = [0_n ; ids]

`SoftPromptLayer` wraps the input embedding module (it owns the prompt's parameters, so adapter
files name them under the embedding) and installs that hook; a method says how its prompt is made
(`soft_prompt()`) and, for DePT, how the real tokens' embeddings change (`adjust_embeddings`).

The helpers at the bottom (`call_keywords`, `cache_in`, `cache_length`, `pad_columns`, `init_rows`)
are shared with prefix tuning, whose hook extends the KV cache instead of the input.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

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

    # --- what a soft-prompt method provides ---------------------------------------------------
    def soft_prompt(self) -> torch.Tensor:
        """The n prompt vectors, (n, d)."""
        raise NotImplementedError

    def adjust_embeddings(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """The real tokens' embeddings (batch, seq, d), the first at position `start`; unchanged by default."""
        return embeds

    # --- written once ---------------------------------------------------------------------------
    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y  # the embedding itself is unchanged; the prompt is prepended by the model's pre-hook

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        """[P ; embeds] for a batch of embeddings (batch, seq, d) -> (batch, n + seq, d)."""
        prompt = self.soft_prompt().to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([prompt, embeds], dim=1)

    def on_attach(self, root: nn.Module) -> None:
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
