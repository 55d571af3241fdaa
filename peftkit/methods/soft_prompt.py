"""Machinery the soft-prompt methods share (prompt tuning, P-tuning, DePT, prefix tuning); no method here.

A soft prompt of n vectors is spliced into a transformers model by a forward pre-hook on the model
that rewrites the call's keyword arguments, so the user's model, `generate` and HF `Trainer` keep
working unchanged:

    inputs_embeds = [P ; E(input_ids)]   (first step only: later decoding steps find P in the KV cache)
    attention_mask = [1_n ; mask],  labels = [-100_n ; labels],  token_type_ids = [0_n ; ids]

`SoftPromptLayer` wraps the input embedding module (it owns the prompt's parameters, so adapter
files name them under the embedding); `PromptSplice`, the adapter's `ModelAdapter`, installs that hook.
A method says how its prompt is made (`soft_prompt()`) and, for DePT, how the real tokens' embeddings
change (`adjust_embeddings`), and registers `PromptSplice` for its config.

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
from ..core.model_adapter import ModelAdapter

CACHE_KEYS = ("cache", "past_key_values")
"""transformers 5 calls the KV cache `cache` (`past_key_values` is its deprecated alias)."""


class SoftPromptLayer(AdapterLayer):
    """Holds a soft prompt on the input embeddings; a pre-hook on the model prepends it to every input."""

    mergeable = False
    routes_itself = True  # mixed-adapter batches: see `_rewrite_routed`

    def __init__(self, base: nn.Module, num_virtual_tokens: int) -> None:
        super().__init__(base)
        self.num_virtual_tokens = num_virtual_tokens

    def mixed_batch_problem(self, root: nn.Module) -> str | None:
        if type(root).__name__.endswith(("ForCausalLM", "LMHeadModel")):
            return None
        method = getattr(getattr(self, "cfg", None), "method", type(self).__name__)
        return (f"{method} (adapter {self.adapter_name!r}) supports mixed-adapter batches (adapter_names=) on causal "
                f"language models only: {type(root).__name__} reads the first position, which is a prompt column for "
                "some samples and not for others; run each adapter's samples in a batch of their own "
                "(peftkit.set_active)")

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

class PromptSplice(ModelAdapter):
    """The whole-model part of a soft prompt: a forward pre-hook on the model rewrites each call's keywords
    (prompt in front of the embeddings, mask, labels, positions); the prompt itself is the layer's."""

    def attach(self, model: nn.Module, layers: dict) -> None:
        super().attach(model, layers)
        self.layer: SoftPromptLayer = self.only_layer()
        self._limit, self._model = check_room(model, self.cfg.method, self.layer.num_virtual_tokens,
                                              *self.layer.positions_needed())
        self._arg_names = forward_arg_names(model)
        self.hook(model.register_forward_pre_hook(self._rewrite_inputs, with_kwargs=True))

    def _rewrite_inputs(self, root: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        layer = self.layer
        if not layer.enabled or not (layer.is_active or layer.routing()):
            return None
        kwargs = call_keywords(self._arg_names, args, kwargs)
        if layer.routing():
            return self._rewrite_routed(root, kwargs)
        n = layer.num_virtual_tokens
        past = cache_in(kwargs)
        past_length = cache_length(past)
        first_step = past_length == 0  # later steps (generate with a cache) find the prompt in the cache
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = layer.base(ids)
        method = self.cfg.method
        check_length(self._limit, self._model, method, n, past_length, embeds.shape[1], prompt_in_past=not first_step)
        embeds = layer.adjust_embeddings(embeds, max(past_length - n, 0))
        batch = embeds.shape[0]
        kwargs["inputs_embeds"] = layer.prepend(embeds) if first_step else embeds
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

    def _rewrite_routed(self, root: nn.Module, kwargs: dict) -> tuple[tuple, dict]:
        """A mixed-adapter call: every sample gets n columns in front; the prompt (and DePT's embedding update)
        where the sample names this adapter, a masked-out zero column elsewhere. Each sample's positions are
        passed explicitly, numbered as if it ran alone, so its real tokens' outputs are those of running it
        alone (with its own prompt, or none); they are the last columns of the output for every sample."""
        layer = self.layer
        n, method = layer.num_virtual_tokens, self.cfg.method
        cache = cache_in(kwargs)
        past_length = cache_length(cache)
        first_step = past_length == 0
        # the prompts of this call sit in the cache from its first step on: each records its columns there, so
        # later steps know how many cached positions are real tokens (several prompt adapters may be routed)
        prompts = cache.__dict__.setdefault("peftkit_prompt_columns", {}) if cache is not None else {}
        past_real = past_length - sum(prompts.values()) if not first_step else 0
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = layer.base(kwargs.pop("input_ids"))
        kwargs.pop("input_ids", None)
        batch = embeds.shape[0]
        on = samples_on(layer, batch, embeds.device, method)
        placed = layer.router.scratch.get("prompt_columns", 0) if first_step else 0  # other prompts' columns
        real = embeds[:, placed:]
        check_length(self._limit, self._model, method, n, past_real, real.shape[1], prompt_in_past=not first_step)
        real = torch.where(on.view(-1, 1, 1), layer.adjust_embeddings(real, past_real), real)
        mask = kwargs.get("attention_mask")
        if mask is None:  # generate drops an all-ones mask; the prompt columns need one
            mask = torch.ones(batch, past_real + real.shape[1], dtype=torch.long, device=embeds.device)
        if first_step:
            prompt = layer.soft_prompt().to(embeds.dtype).unsqueeze(0) * on.view(-1, 1, 1).to(embeds.dtype)
            embeds = torch.cat([prompt, embeds[:, :placed], real], dim=1)
            pad_columns(kwargs, "labels", n, -100, batch)
            pad_columns(kwargs, "token_type_ids", n, 0, batch)
            layer.router.scratch["prompt_columns"] = placed + n
            prompts[layer.adapter_name] = n
        else:
            embeds = real
        kwargs["inputs_embeds"] = embeds
        if mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([on.view(-1, 1).expand(-1, n).to(mask.dtype), mask], dim=1)
        set_positions(root, self._arg_names, self._limit, kwargs, on, n, real.shape[1], first_step, past_real, method)
        kwargs.pop("cache_position", None)
        return (), kwargs


def samples_on(layer: AdapterLayer, batch: int, device: torch.device, method: str) -> torch.Tensor:
    """(batch,) bool: the samples of a mixed-adapter call that name this prompt adapter."""
    weight = layer.sample_weights(batch, device)
    if bool(((weight != 0) & (weight != 1)).any()):
        raise ConfigError(f"{method} (adapter {layer.adapter_name!r}): a prompt is in a sample or not, so its "
                          "adapter_weights must be 0 or 1; fractional weights mix weight-space updates only")
    return weight != 0


def position_start(root: nn.Module) -> int:
    """The first position id of the model's numbering (RoBERTa: padding_idx + 1; OPT adds its offset itself)."""
    for name, module in root.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "position_embeddings", "embed_positions"):
            if isinstance(getattr(module, "offset", None), int) or module.padding_idx is None:
                return 0
            return module.padding_idx + 1
    return 0


def set_positions(root: nn.Module, arg_names: list[str], limit, kwargs: dict, on: torch.Tensor, n: int, seq: int,
                  new_columns: bool, past_real: int, method: str) -> None:
    """Per-sample position ids for a mixed-adapter call: a sample that names the adapter numbers its tokens
    after the n positions of its prompt/prefix, the others as without it (`new_columns`: n columns were
    prepended in this call, numbered 0..n-1 for the samples that use them)."""
    if "position_ids" not in arg_names:
        if limit is not None and limit[1]:
            raise ConfigError(f"{method}: {type(root).__name__} has absolute positions but takes no position_ids, "
                              "so samples with and without the prompt cannot be numbered apart in one batch")
        return
    start = position_start(root)
    given = kwargs.get("position_ids")
    if given is None:
        given = start + past_real + torch.arange(seq, device=on.device).unsqueeze(0)
    elif given.shape[-1] > seq:  # another prompt adapter in this call numbered its own columns already
        given = given[..., -seq:]
        head = kwargs["position_ids"][..., :-seq]
    shifted = given.expand(on.shape[0], -1) + on.long().unsqueeze(1) * n
    parts = []
    if new_columns:
        prompt = torch.arange(n, device=on.device).unsqueeze(0) + start
        parts.append(torch.where(on.view(-1, 1), prompt, torch.full_like(prompt, start)))
    if kwargs.get("position_ids") is not None and kwargs["position_ids"].shape[-1] > seq:
        parts.append(head.expand(on.shape[0], -1))
    kwargs["position_ids"] = torch.cat([*parts, shifted], dim=1)


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
