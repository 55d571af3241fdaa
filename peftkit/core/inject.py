"""Target matching and module replacement.

Target syntax (shared by `targets`, `exclude` and per-module patterns such as LoRA's `rank_pattern`):

* a name or dotted suffix matches on component boundaries: "q_proj" matches
  "model.layers.0.self_attn.q_proj" but not "model.layers.0.self_attn.xq_proj";
* "re:<regex>" is matched against the whole module name;
* "all-linear" is every linear layer (nn.Linear, GPT-2 Conv1D) except the output head;
* "all-norms" is every normalisation layer (`weights.is_norm`: LayerNorm, RMSNorm ...) outside the head;
* "input-embeddings" is the model's input embedding module (`get_input_embeddings()`);
* "role:<role>" is every module playing that role in this model's architecture ("role:attn-out": the
  attention output projections), resolved by `architectures.modules_with_role`.
"""

from __future__ import annotations

import re

import regex
import torch.nn as nn

from . import architectures, weights
from .config import AdapterConfig, ConfigError
from .weights import is_linear, is_norm

HEAD_NAMES = ("lm_head", "classifier", "score", "head", "cls", "qa_outputs")


def matches(name: str, pattern: str) -> bool:
    """True when module `name` matches one target pattern (see the module docstring)."""
    if pattern.startswith("re:"):
        return _regex_match(pattern, name)
    return name == pattern or name.endswith("." + pattern)


REGEX_TIMEOUT_S = 0.25
"""Longest one regex target may take on one module name: a pattern from an adapter file such as
"re:(a+)+$" backtracks exponentially, and must fail loading, not hang it."""


def _regex_match(pattern: str, name: str) -> bool:
    """`re.fullmatch` with a time limit (the `regex` package's), turning every failure into a ConfigError."""
    try:
        return regex.fullmatch(pattern[3:], name, timeout=REGEX_TIMEOUT_S) is not None
    except TimeoutError as err:
        raise ConfigError(f"target {pattern!r} took over {REGEX_TIMEOUT_S} s on module {name!r} (a regex that "
                          "backtracks exponentially, like '(a+)+$'); write it without nested repetition") from err
    except (regex.error, re.error) as err:
        raise ConfigError(f"target {pattern!r} is not a valid regular expression ({err})") from err


def head_module_names(model: nn.Module) -> set[str]:
    """Names of the output head(s): `get_output_embeddings()` plus conventional head names."""
    heads = {n for n, _ in plain_modules(model) if n.split(".")[-1] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads |= {n for n, m in plain_modules(model) if m is out or weights.plain(m) is out}
    return heads


def input_embedding_name(model: nn.Module) -> str:
    """Module name of the model's input embeddings."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    for name, module in plain_modules(model):
        if module is emb or (emb is not None and weights.plain(module) is weights.plain(emb)):
            _refuse_embedding_copies(model, name, module)
            return name
    raise ConfigError(f"{type(model).__name__} has no get_input_embeddings(); name the embedding in `targets`")


def _refuse_embedding_copies(model: nn.Module, name: str, module: nn.Module) -> None:
    """Refuse input embeddings that the forward reaches through other modules sharing their weight.

    Why: T5's `get_input_embeddings()` is `shared`, but its encoder and decoder call their own
    `embed_tokens` modules, tied to `shared.weight`; an adapter on `shared` would silently do nothing.
    """
    weight = getattr(module, "weight", None)
    copies = [n for n, m in plain_modules(model)
              if m is not module and weight is not None and getattr(m, "weight", None) is weight
              and isinstance(weights.plain(m), nn.Embedding)]
    if copies:
        raise ConfigError(f"the input embeddings {name!r} of {type(model).__name__} share their weight with "
                          f"{', '.join(copies)}, which the forward may call instead; name the embedding modules "
                          f"to adapt in `targets` (e.g. {copies[:2]})")


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted module name ("model.layers.3.mlp" -> 3)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every linear-like layer, for error messages."""
    return [n for n, m in plain_modules(model) if is_linear(m)]


def _selected(name: str, module: nn.Module, cfg: AdapterConfig, heads: set[str], inputs: str | None,
              roles: dict[str, set[str]]) -> bool:
    targets = _as_list(cfg.targets)
    hit = False
    in_head = any(name == h or name.startswith(h + ".") for h in heads)
    for target in targets:
        if target == "all-linear":
            hit = is_linear(module) and not in_head
        elif target == "all-norms":
            hit = is_norm(module) and not in_head
        elif target == "input-embeddings":
            hit = name == inputs
        elif architectures.is_role(target):
            hit = name in roles[target]
        else:
            hit = matches(name, target)
        if hit:
            break
    if not hit or any(name in roles[p] if architectures.is_role(p) else matches(name, p) for p in cfg.exclude):
        return False
    return cfg.layers is None or layer_index(name) in cfg.layers


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Names of the modules `cfg` selects; raises, listing candidates, when nothing matches."""
    heads = head_module_names(model)
    wants_inputs = "input-embeddings" in _as_list(cfg.targets)
    inputs = input_embedding_name(model) if wants_inputs else None
    tokens = [t for t in _as_list(cfg.targets) + list(cfg.exclude) if architectures.is_role(t)]
    roles = {t: set(architectures.modules_with_role(model, architectures.role_name(t))) for t in tokens}
    names = [n for n, m in plain_modules(model) if n and _selected(n, m, cfg, heads, inputs, roles)]
    if not names:
        linear = ", ".join(_shorten(linear_module_names(model)))
        absent = [t for t in tokens if t in _as_list(cfg.targets) and not roles[t]]
        why = f" (this architecture has no module with role {', '.join(absent)})" if absent else ""
        raise ConfigError(
            f"no module matched targets {cfg.targets!r} (exclude={cfg.exclude}, layers={cfg.layers}) of {cfg.method} "
            f"in {architectures.describe(model)}{why}; name the modules in `targets`; linear modules in this "
            f"model: {linear or 'none'}"
        )
    return names


def _as_list(targets: str | list[str] | None) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets or [])


def _shorten(names: list[str]) -> list[str]:
    """Unique last components in order: "q_proj, k_proj, ..." rather than every full name."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(n.split(".")[-1], None)
    return list(seen)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name` ("" is the model itself), by the names the user's model has: a name under
    an adapted module is looked up in the module the adapter layers wrap (`self_attn.q_proj` finds q_proj
    inside an adapted self_attn), and an adapted module's own name gives its outermost adapter layer."""
    module = model
    for part in name.split(".") if name else []:
        while part not in module._modules and getattr(type(module), "wraps_base", False):
            module = module._modules["base"]
        child = module._modules.get(part)
        if child is None:
            raise AttributeError(f"{type(module).__name__} has no attribute `{part}` (looking up {name!r})")
        module = child
    return module


def plain_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`named_modules()` as the user's model has them: an adapted module appears once, as its outermost
    adapter layer, and what adapters added (their submodules, the wrapped `base` chain) is not listed."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        out.append((prefix, module))
        inner = weights.plain(module)
        for child_name, child in inner._modules.items():
            if child is not None:
                walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return out


def swap_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is held (by the model's modules, or by an adapter layer stacked on it)."""
    holders = [(parent, child) for parent in model.modules() for child, module in parent._modules.items()
               if module is old]
    for parent, child in holders:
        setattr(parent, child, new)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` was, and under every other name the same module object has; returns the old one.

    Why every name: a module can be shared (T5's `shared` embedding is also `encoder.embed_tokens` and
    `decoder.embed_tokens`); `named_modules` lists it once, and replacing that one name would leave the
    forward calling the unadapted module through the others, silently.
    """
    old = get_module(model, name)
    swap_module(model, old, new)
    return old
