"""Prefix tuning: trainable key/value prefixes in every attention layer (Li & Liang, 2021, arXiv:2101.00190).

Each layer l attends over n extra positions whose keys and values are free parameters:

    Attn_l(x) = softmax(q [P_k,l ; K_l(x)]^T / sqrt(d_h)) [P_v,l ; V_l(x)],   P_k,l, P_v,l in R^{n x d_kv},

with the attention mask extended by n ones (every real token sees the whole prefix). Trainable:
2 L n d_kv, d_kv = key/value heads x head size (= d without grouped-query attention). With
`projection=True` the prefixes come from peft's reparameterization MLP, trained instead:
P = Linear(h, 2 L d_kv)(tanh(Linear(d, h)(E))), E in R^{n x d}; trainable n d + d h + h + 2 L d_kv (h + 1).
A peft export (and `prefix_states()`) holds the computed prefixes only: the MLP is a training device.

Injection: through transformers' KV cache, as peft does. A forward pre-hook on the outermost module
whose forward takes a cache (the model for Llama/GPT-2, `bert` under BertForSequenceClassification)
fills an empty cache with the prefixes (a new DynamicCache when the call has none) and pads the 2-D
attention mask by n ones. `generate` works with use_cache: its first step fills the cache it made,
the prefix stays there while decoding, and greedy decoding with the cache equals recomputing from
scratch. Why the cache and not an attention hook: every transformers 5 attention module already
concatenates the cache's keys before its attention kernel, and masks are built from the cache length,
so nothing model-specific is needed. Not usable with gradient checkpointing (transformers drops the
cache in checkpointed layers); that raises rather than training without the prefix.

Positions: with a filled cache the model numbers the real tokens n, n+1, ... (peft and the paper's
GPT-2 code do the same; needed for equal outputs with peft). `shift_positions=False` keeps them at
0, 1, ... (the prefix then takes no position; position ids a caller passes are kept as given).

Choices: init "vocab" (default) sets the prefixes to the keys/values the frozen model computes for
n random vocabulary tokens: the paper's "activations of real words" init, which it reports trains
far better than random (it chose task words; random ones need no tokenizer). At init a causal model
then sees exactly those n words in front of its input. "random" is peft's N(0, 1). With the MLP, "vocab" initialises E with word
embeddings of random tokens. Default n = 10 (the paper's table-to-text setting), h = d (peft).
Not mergeable (the attention gets longer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core.architectures import describe
from ..core.config import AdapterConfig, ConfigError
from ..core.layer import AdapterLayer
from ..core.model_adapter import ModelAdapter
from ..core.registry import register, register_model_adapter
from .lora import adapter_dtype
from .soft_prompt import (
    CACHE_KEYS,
    cache_in,
    cache_length,
    call_keywords,
    check_length,
    check_room,
    forward_arg_names,
    init_rows,
    pad_columns,
    samples_on,
    set_positions,
)


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Trainable key/value prefixes in every attention layer, through the KV cache."""

    method = "prefix-tuning"
    paper: ClassVar[str] = "Li & Liang 2021, arXiv:2101.00190"
    trainable: ClassVar[str] = "2 L n d_kv (with projection: n d + d h + h + 2 L d_kv (h + 1))"

    targets: str | list[str] | None = "input-embeddings"
    """The input embedding module, which holds the prefixes (found through get_input_embeddings())."""

    num_virtual_tokens: int = 10
    """Prefix length n (keys and values per layer)."""

    projection: bool = False
    """Train the prefixes through peft's MLP reparameterization (embedding -> Linear -> tanh -> Linear)."""

    projection_hidden: int | None = None
    """Hidden width h of the MLP; None: the model's hidden size d."""

    init: str = "vocab"
    """"vocab" (keys/values the model computes for random tokens) or "random" (N(0, 1), peft's)."""

    shift_positions: bool = True
    """Real tokens take positions n, n+1, ... after the prefix (peft, the paper's code); False: 0, 1, ..."""

    seed: int = 0
    """Seed of the random tokens and of the MLP's initialisation."""

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.init not in ("vocab", "random"):
            raise ConfigError(f"unknown prefix init {self.init!r}; choose vocab or random")
        if self.projection_hidden is not None and (not isinstance(self.projection_hidden, int)
                                                   or self.projection_hidden < 1):
            raise ConfigError(f"projection_hidden must be a positive integer or None, got {self.projection_hidden!r}")


class PrefixLayer(AdapterLayer):
    """Holds every layer's prefixes on the input embeddings; a pre-hook puts them in the KV cache.

    Mixed-adapter batches: the prefix is in the cache for every sample and masked for those that do not
    name the adapter (`_inject_routed`).

    The prefix shapes depend on the whole model (layers, key/value heads), which `build` does not
    see, so the parameters are made by `PrefixHooks.attach`; `reset_parameters` (run before it by `apply`)
    only marks them for initialisation there.
    """

    mergeable = False

    def __init__(self, base: nn.Embedding, cfg: PrefixTuningConfig) -> None:
        super().__init__(base)
        self.cfg = cfg
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.kv_shape: tuple[int, int, int] | None = None  # (layers, key/value heads, head size)
        self._init_pending = False
        self._own_cache = None  # a cache made for a use_cache=False call: not returned
        self._backbone: tuple[nn.Module, ...] = ()  # the module that takes the cache (a tuple: not a child)
        self._arg_names: list[str] = []
        self._cache_key = "cache"
        self._checkpointed: list[nn.Module] = []  # modules with a gradient_checkpointing flag
        self._limit: tuple[int, bool] | None = None  # (positions, absolute): soft_prompt.check_room
        self._model = ""

    routes_itself = True

    # --- parameters -----------------------------------------------------------------------------
    def _make_parameters(self) -> None:
        layers, heads, head_dim = self.kv_shape
        n, width = self.num_virtual_tokens, 2 * layers * heads * head_dim
        w = self.base.weight
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        if not self.cfg.projection:
            self.prefix = nn.Parameter(torch.zeros(n, width, **kw))
            return
        hidden = self.cfg.projection_hidden or w.shape[1]
        self.prefix_embedding = nn.Parameter(torch.zeros(n, w.shape[1], **kw))
        self.mlp = nn.Sequential(nn.Linear(w.shape[1], hidden, **kw), nn.Tanh(), nn.Linear(hidden, width, **kw))

    def reset_parameters(self) -> None:
        self._init_pending = True
        if self.kv_shape is not None:
            self._initialise()

    @torch.no_grad()
    def _initialise(self) -> None:
        cfg, n = self.cfg, self.num_virtual_tokens
        if cfg.projection:
            self.prefix_embedding.copy_(init_rows(self.base.weight, n, cfg.init, cfg.seed))
            with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's random stream
                torch.manual_seed(cfg.seed)
                self.mlp[0].reset_parameters()
                self.mlp[2].reset_parameters()
        elif cfg.init == "random":
            self.prefix.copy_(torch.randn(self.prefix.shape, generator=torch.Generator().manual_seed(cfg.seed)))
        else:
            self.prefix.copy_(self._word_activations().reshape(n, -1))
        self._init_pending = False

    def _word_activations(self) -> torch.Tensor:
        """(n, 2L, heads, head size): the frozen model's keys and values for n random vocabulary tokens."""
        from transformers import DynamicCache

        (backbone,), n = self._backbone, self.num_virtual_tokens
        ids = torch.randint(0, self.base.weight.shape[0], (1, n), generator=torch.Generator().manual_seed(self.cfg.seed))
        cache, was_training = DynamicCache(), backbone.training
        self.enabled = False
        try:
            backbone.eval()
            backbone(input_ids=ids.to(self.base.weight.device), **{self._cache_key: cache, "use_cache": True})
        finally:
            self.enabled = True
            backbone.train(was_training)
        pairs = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # (2, heads, n, hd)
        return torch.stack(pairs).flatten(0, 1).permute(2, 0, 1, 3).float()  # (n, 2L, heads, hd)

    def prefix_states(self) -> torch.Tensor:
        """The prefixes as (n, 2L, key/value heads, head size): keys of layer l at 2l, values at 2l + 1."""
        flat = self.mlp(self.prefix_embedding) if self.cfg.projection else self.prefix
        return flat.view(self.num_virtual_tokens, 2 * self.kv_shape[0], *self.kv_shape[1:])

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y  # the embedding itself is unchanged; the prefixes enter through the KV cache

    # --- the call, with `PrefixHooks` installed ---------------------------------------------
    def _inject(self, backbone: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.enabled or not (self.is_active or self.routing()):
            return None
        if backbone.training and torch.is_grad_enabled() and any(m.gradient_checkpointing for m in self._checkpointed):
            raise RuntimeError("prefix tuning needs the KV cache, which transformers drops under gradient "
                               "checkpointing; turn it off (model.activation_checkpointing_disable())")
        kwargs = call_keywords(self._arg_names, args, kwargs)
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            return (), kwargs  # the model itself says that it needs input_ids or inputs_embeds
        batch, seq = tokens.shape[:2]
        if self.routing():
            return self._inject_routed(kwargs, batch, seq, tokens.device)
        cache = self._take_cache(kwargs)
        past = cache_length(cache)
        taken = self.num_virtual_tokens if self.cfg.shift_positions else 0  # positions the prefix takes
        before = past - self.num_virtual_tokens + taken if past else 0  # positions before these tokens, once filled
        check_length(self._limit, self._model, self.cfg.method, taken, before, seq, prompt_in_past=past > 0)
        if past == 0:
            self._fill(cache, batch)
            past = self.num_virtual_tokens
        kwargs[self._cache_key] = cache
        pad_columns(kwargs, "attention_mask", self.num_virtual_tokens, 1, batch)
        given = kwargs.get("position_ids")
        if self.cfg.shift_positions and given is not None:
            kwargs["position_ids"] = given + self.num_virtual_tokens  # as the model numbers them itself
        elif not self.cfg.shift_positions and given is None:
            start = past - self.num_virtual_tokens
            kwargs["position_ids"] = torch.arange(start, start + seq, device=tokens.device).unsqueeze(0)
        return (), kwargs

    def _take_cache(self, kwargs: dict):
        """The call's KV cache, taken out of `kwargs` under either name; a new one when it has none."""
        cache = cache_in(kwargs)
        for key in CACHE_KEYS:
            kwargs.pop(key, None)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
            self._own_cache = cache if kwargs.get("use_cache") is False else None
        return cache

    def _inject_routed(self, kwargs: dict, batch: int, seq: int, device: torch.device) -> tuple[tuple, dict]:
        """A mixed-adapter call: the prefix goes into the cache for every sample, and the attention mask shows it
        only to the samples that name this adapter; their tokens are numbered after it (`shift_positions`),
        the others' as without it, so each sample computes what it computes alone."""
        n, name = self.num_virtual_tokens, self.adapter_name
        on = samples_on(self, batch, device, self.cfg.method)
        cache = self._take_cache(kwargs)
        filled = cache.__dict__.setdefault("peftkit_prefixes", {})  # adapter name -> columns, in cache order
        past_real = cache_length(cache) - sum(filled.values())
        if name not in filled:
            if past_real:
                raise ConfigError(f"prefix adapter {name!r} joined a mixed-adapter call after its first step; name it "
                                  "in adapter_names from the start (the cache holds tokens without its prefix)")
            self._fill(cache, batch, on)
            filled[name] = n
        kwargs[self._cache_key] = cache
        mask = kwargs.get("attention_mask")
        if mask is None:  # generate drops an all-ones mask; the prefix columns need one
            mask = torch.ones(batch, past_real + seq, dtype=torch.long, device=device)
        if mask.dim() == 2:
            at = list(filled).index(name)
            before = sum(list(filled.values())[:at])  # earlier prefixes' mask columns, in cache order
            columns = on.view(-1, 1).expand(-1, n).to(mask.dtype)
            kwargs["attention_mask"] = torch.cat([mask[:, :before], columns, mask[:, before:]], dim=1)
        set_positions(self._root_name_holder[0], self._arg_names, self._limit, kwargs, on,
                      n if self.cfg.shift_positions else 0, seq, False, past_real, self.cfg.method)
        kwargs.pop("cache_position", None)
        return (), kwargs

    def _drop_own_cache(self, backbone: nn.Module, args: tuple, output):
        # a model called with use_cache=False returns no cache; Llama would return the one made here, and
        # generate(use_cache=False) would then feed it back with the whole sequence again
        own, self._own_cache = self._own_cache, None
        if own is not None and getattr(output, "cache", None) is own:
            return type(output)(**{k: v for k, v in output.items() if k != "cache"})  # "cache" leaves its keys
        return output

    def _fill(self, cache, batch: int, on: torch.Tensor | None = None) -> None:
        """Put every layer's prefix keys and values into an empty cache, (batch, heads, n, head size) each
        (zeros for the samples of a mixed-adapter call that do not name this adapter: `on`)."""
        device = self.base.weight.device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else self.base.weight.dtype
        states = self.prefix_states().to(dtype).permute(1, 2, 0, 3)  # (2L, heads, n, hd)
        for layer in range(self.kv_shape[0]):
            keys, values = (states[2 * layer + i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
            if on is not None:
                keys, values = (t * on.view(-1, 1, 1, 1).to(t.dtype) for t in (keys, values))
            cache.update(keys, values, layer)


def cache_taking_module(root: nn.Module) -> nn.Module:
    """The outermost module whose forward takes a KV cache (`cache` or `past_key_values`)."""
    for module in root.modules():
        if any(key in forward_arg_names(module) for key in CACHE_KEYS):
            return module
    raise ConfigError(f"prefix tuning needs a transformers model whose forward takes a KV cache (`cache`); "
                      f"{type(root).__name__} has none. Use prompt tuning or P-tuning for other models")


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"prefix tuning reads layers and heads from a transformers config; {type(model).__name__} "
                          "has no .config")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a transformers model's self-attention."""
    config = _text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def check_fits(model: nn.Module, cfg: PrefixTuningConfig) -> None:
    """Refuse a prefix that leaves no room for real tokens, or a model that checkpoints gradients (a prefix
    that leaves too little room in absolute positions: `check_room`)."""
    config = _text_config(model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ConfigError(f"prefix-tuning fills one self-attention KV cache (decoder-only and encoder-only models); "
                          f"{describe(model)} is an encoder-decoder model: use prompt tuning or LoRA")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and cfg.num_virtual_tokens >= limit:
        raise ConfigError(f"a prefix of {cfg.num_virtual_tokens} tokens does not fit {type(model).__name__}'s "
                          f"{limit} positions; use num_virtual_tokens well below {limit}")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ConfigError("prefix tuning needs the KV cache, which transformers drops under gradient checkpointing; "
                          "call model.activation_checkpointing_disable() first")


@register_model_adapter(PrefixTuningConfig)
class PrefixHooks(ModelAdapter):
    """Reads the model's geometry (layers, key/value heads, positions), makes the prefix parameters it decides,
    and hooks the backbone: the prefixes go into the KV cache before each call, and a cache made for a
    `use_cache=False` call is dropped after it."""

    def attach(self, model: nn.Module, layers: dict) -> None:
        super().attach(model, layers)
        layer: PrefixLayer = self.only_layer()
        backbone = cache_taking_module(model)
        check_fits(model, self.cfg)
        n = layer.num_virtual_tokens
        layer._limit, layer._model = check_room(model, self.cfg.method, n, n + 1)
        layer.kv_shape = kv_shape(model)
        layer._backbone = (backbone,)
        layer._arg_names = forward_arg_names(backbone)
        layer._cache_key = next(k for k in CACHE_KEYS if k in layer._arg_names)
        layer._checkpointed = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        layer._root_name_holder = (model,)  # a tuple: not registered as a submodule
        if not hasattr(layer, "prefix") and not hasattr(layer, "mlp"):
            layer._make_parameters()
        if layer._init_pending:
            layer._initialise()
        self.hook(backbone.register_forward_pre_hook(layer._inject, with_kwargs=True))
        self.hook(backbone.register_forward_hook(layer._drop_own_cache))


@register(PrefixTuningConfig)
def build(module: nn.Module, cfg: PrefixTuningConfig, name: str) -> PrefixLayer | None:
    """Wrap the input embedding module."""
    if not isinstance(module, nn.Embedding):
        return None
    return PrefixLayer(module, cfg)
