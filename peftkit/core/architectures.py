"""Module roles per architecture: which modules of a model are its query, key and value projections, its
fused q/k/v projection (and how to split it), attention output, MLP up/gate/down projections and norms;
and how many absolute positions the model has.

Why: a method's default targets are a statement about roles ("the attention output and the MLP down
projection"), not about names. Names differ per family (Llama `o_proj`, GPT-2 `attn.c_proj`, GPT-NeoX
`attention.dense`, BERT `attention.output.dense`, T5 `SelfAttention.o`), so a name list misses every
family it does not spell out. Methods write targets as role tokens, `"role:attn-out"`, and `inject`
resolves them here against the model: by `config.model_type` in `FAMILIES`, else (an unknown model) by
every family's patterns at once, which is what a name list did, with the same reach.

Roles (`ROLES`): "query", "key", "value" (separate projections, or the fused one that holds them),
"qkv" (fused projections only), "attn-out", "mlp-up", "mlp-gate", "mlp-gate-up" (fused, Phi-3),
"mlp-down", "attention" and "mlp" (the blocks' attention and MLP modules), "attn-norm", "mlp-norm".

A fused projection's output is laid out per family (`qkv_rows`): one q | k | v concatenation (GPT-2,
Phi-3 with its own key/value head count, timm ViT, Falcon multi-query), interleaved per head
[q_h, k_h, v_h] (GPT-NeoX, BLOOM, DeBERTa, Falcon without multi-query), or per key/value group
[q_g1 .. q_gG, k_g, v_g] (Falcon's new decoder architecture).

The pattern tables follow Hugging Face peft's TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING for the
families both cover (e.g. (IA)^3's feed-forward modules are the "mlp-down" role here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ConfigError
from .layer import AdapterLayer
from .weights import in_out_features, is_linear, is_norm

ROLE_PREFIX = "role:"
ROLES = ("query", "key", "value", "qkv", "attn-out", "mlp-up", "mlp-gate", "mlp-gate-up", "mlp-down",
         "attention", "mlp", "attn-norm", "mlp-norm")
PROJECTIONS = ("query", "key", "value")
"""Roles that a fused q/k/v projection holds too."""

_BERT_FFN_OUT = r"re:.*\.layer\.\d+\.output\.dense"  # the FFN's output.dense, not attention.output.dense


@dataclass(frozen=True)
class Family:
    """Module-name patterns per role (the `targets` syntax) and the fused q/k/v layout of one family."""

    roles: dict[str, tuple[str, ...]]
    qkv_layout: str | Callable[[object], str] | None = None
    """"concat", "per-head" or "grouped" (see the module docstring), or a function of the model config."""
    label: str = ""
    """How errors name the family."""


def _decoder(attn: str, q: str, k: str, v: str, out: str, up: str, down: str, gate: str | None = None,
             mlp: str | None = "mlp", norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm"),
             label: str = "") -> Family:
    roles = {"query": (f"{attn}.{q}",), "key": (f"{attn}.{k}",), "value": (f"{attn}.{v}",),
             "attn-out": (f"{attn}.{out}",), "mlp-up": (up,), "mlp-down": (down,), "attention": (attn,),
             "attn-norm": (norms[0],), "mlp-norm": (norms[1],)}
    if gate:
        roles["mlp-gate"] = (gate,)
    if mlp:
        roles["mlp"] = (mlp,)
    return Family(roles, label=label)


def _fused(attn: str, qkv: str, out: str, up: str, down: str, layout, label: str,
           norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm"), gate_up: str | None = None,
           mlp: str | None = "mlp") -> Family:
    roles = {"qkv": (f"{attn}.{qkv}",), "attn-out": (f"{attn}.{out}",), "mlp-down": (down,), "attention": (attn,),
             "attn-norm": (norms[0],), "mlp-norm": norms[1:]}
    roles["mlp-gate-up" if gate_up else "mlp-up"] = (gate_up or up,)
    if mlp:
        roles["mlp"] = (mlp,)
    for role in PROJECTIONS:
        roles[role] = roles["qkv"]
    return Family(roles, qkv_layout=layout, label=label)


def _falcon_layout(config) -> str:
    if getattr(config, "new_decoder_architecture", False):
        return "grouped"
    return "concat" if getattr(config, "multi_query", False) else "per-head"


_LLAMA = _decoder("self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "mlp.up_proj", "mlp.down_proj",
                  gate="mlp.gate_proj", label="Llama-style")
_GEMMA2 = Family({**_LLAMA.roles, "mlp-norm": ("pre_feedforward_layernorm",)}, label="Gemma 2/3")
_BERT = Family({"query": ("attention.self.query", "attention.attention.query"),
                "key": ("attention.self.key", "attention.attention.key"),
                "value": ("attention.self.value", "attention.attention.value"),
                "attn-out": ("attention.output.dense",), "mlp-up": ("intermediate.dense",),
                "mlp-down": (_BERT_FFN_OUT,), "attention": ("attention",),
                "attn-norm": ("attention.output.LayerNorm",), "mlp-norm": (r"re:.*\.layer\.\d+\.output\.LayerNorm",)},
               label="BERT-style encoder")
_T5 = Family({"query": ("SelfAttention.q", "EncDecAttention.q"), "key": ("SelfAttention.k", "EncDecAttention.k"),
              "value": ("SelfAttention.v", "EncDecAttention.v"), "attn-out": ("SelfAttention.o", "EncDecAttention.o"),
              "mlp-up": ("DenseReluDense.wi", "DenseReluDense.wi_1"), "mlp-gate": ("DenseReluDense.wi_0",),
              "mlp-down": ("DenseReluDense.wo",), "mlp": ("DenseReluDense",),
              "attention": ("SelfAttention", "EncDecAttention"), "attn-norm": ("layer.0.layer_norm",)},
             label="T5 encoder-decoder")
_NEOX_MLP = ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

FAMILIES: dict[str, Family] = {
    **{t: _LLAMA for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "olmo", "olmo2",
                           "granite", "stablelm", "cohere", "starcoder2")},
    **{t: _GEMMA2 for t in ("gemma2", "gemma3", "gemma3_text")},
    "phi": _decoder("self_attn", "q_proj", "k_proj", "v_proj", "dense", "mlp.fc1", "mlp.fc2",
                    norms=("input_layernorm", "input_layernorm"), label="Phi-1/2"),
    "phi3": _fused("self_attn", "qkv_proj", "o_proj", "", "mlp.down_proj", "concat", "Phi-3",
                   gate_up="mlp.gate_up_proj"),
    "gpt2": _fused("attn", "c_attn", "c_proj", "mlp.c_fc", "mlp.c_proj", "concat", "GPT-2", norms=("ln_1", "ln_2")),
    "gpt_bigcode": _fused("attn", "c_attn", "c_proj", "mlp.c_fc", "mlp.c_proj", "concat", "GPT-BigCode",
                          norms=("ln_1", "ln_2")),
    "gpt_neox": _fused("attention", "query_key_value", "dense", *_NEOX_MLP, "per-head", "GPT-NeoX"),
    "bloom": _fused("self_attention", "query_key_value", "dense", *_NEOX_MLP, "per-head", "BLOOM"),
    **{t: _fused("self_attention", "query_key_value", "dense", *_NEOX_MLP, _falcon_layout, "Falcon",
                 norms=("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp"))
       for t in ("falcon", "RefinedWeb", "RefinedWebModel")},
    "gptj": _decoder("attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc_in", "mlp.fc_out",
                     norms=("ln_1", "ln_1"), label="GPT-J"),
    "opt": _decoder("self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", mlp=None,
                    norms=("self_attn_layer_norm", "final_layer_norm"), label="OPT"),
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilroberta")},
    "deberta-v2": Family({**_BERT.roles, "query": ("attention.self.query_proj",), "key": ("attention.self.key_proj",),
                          "value": ("attention.self.value_proj",)}, label="DeBERTa-v2"),
    "deberta": Family({**_BERT.roles, "qkv": ("attention.self.in_proj",),
                       **{r: ("attention.self.in_proj",) for r in PROJECTIONS}}, qkv_layout="per-head",
                      label="DeBERTa"),
    **{t: _T5 for t in ("t5", "mt5", "umt5")},
    "vit": Family({"query": ("attention.q_proj", "attention.attention.query"),
                   "key": ("attention.k_proj", "attention.attention.key"),
                   "value": ("attention.v_proj", "attention.attention.value"),
                   "attn-out": ("attention.o_proj", "attention.output.dense"),
                   "mlp-up": ("mlp.fc1", "intermediate.dense"), "mlp-down": ("mlp.fc2", _BERT_FFN_OUT),
                   "mlp": ("mlp",), "attention": ("attention",), "attn-norm": ("layernorm_before",),
                   "mlp-norm": ("layernorm_after",)}, label="ViT"),
    # peftkit's own vision models (peftkit.train.vision): timm names; the CNN has no attention or MLP
    "peftkit-vit": _fused("attn", "qkv", "proj", "mlp.fc1", "mlp.fc2", "concat", "ViT (timm names)",
                          norms=("norm1", "norm2")),
    "peftkit-cnn": Family({}, label="CNN"),
}
"""model_type -> roles. Models whose type is missing are resolved by every family's patterns at once."""

_FUSED_NAMES = {"c_attn": "concat", "qkv": "concat", "qkv_proj": "concat", "Wqkv": "concat"}
"""Fused q/k/v layouts an unknown model's module name settles; `query_key_value` and `in_proj` do not."""


def model_type(model: nn.Module) -> str | None:
    """The model's `config.model_type` (peftkit's vision models: "peftkit-vit" / "peftkit-cnn"), or None."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind:
        return kind
    arch = getattr(config, "architecture", None)
    return f"peftkit-{arch}" if isinstance(arch, str) else None


def describe(model: nn.Module) -> str:
    """How errors name a model: class, family and model type ("GPTNeoXForCausalLM (GPT-NeoX, gpt_neox)")."""
    kind = model_type(model)
    family = FAMILIES.get(kind or "")
    inside = ", ".join(x for x in (family.label if family else "", kind or "") if x)
    return f"{type(model).__name__} ({inside or 'unknown architecture'})"


def family_of(model: nn.Module) -> Family:
    """The model's family; an unknown model gets every family's patterns (the structural fallback)."""
    family = FAMILIES.get(model_type(model) or "")
    if family is not None:
        return family
    merged: dict[str, tuple[str, ...]] = {}
    for fam in FAMILIES.values():
        for role, patterns in fam.roles.items():
            merged[role] = tuple(dict.fromkeys(merged.get(role, ()) + patterns))
    return Family(merged, label="")


def is_role(pattern: object) -> bool:
    """True for a role token such as "role:attn-out"."""
    return isinstance(pattern, str) and pattern.startswith(ROLE_PREFIX)


def role_name(token: str) -> str:
    """"role:attn-out" -> "attn-out"; an unknown role raises and lists the known ones."""
    role = token[len(ROLE_PREFIX):]
    if role not in ROLES:
        raise ConfigError(f"unknown role {token!r} in targets; roles: {', '.join(ROLE_PREFIX + r for r in ROLES)}")
    return role


def modules_with_role(model: nn.Module, role: str) -> list[str]:
    """Names of the model's modules that play `role` (projections: linear layers only), in model order."""
    from .inject import matches  # inject imports this module

    patterns = family_of(model).roles.get(role, ())
    containers = role in ("attention", "mlp")
    found = []
    for name, module in model.named_modules():
        if not name or not any(matches(name, p) for p in patterns):
            continue
        module = module.base if isinstance(module, AdapterLayer) else module  # an adapted model's roles too
        if containers and any(is_linear(m) for m in module.modules()) and not is_linear(module):
            found.append(name)
        elif role.endswith("norm") and is_norm(module):
            found.append(name)
        elif not containers and not role.endswith("norm") and is_linear(module):
            found.append(name)
    if containers:  # the outermost only (T5's "SelfAttention" inside "layer.0"): drop names inside another
        found = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    return found


def matches_target(model: nn.Module, name: str, pattern: str) -> bool:
    """`inject.matches` that also resolves role tokens against `model`."""
    from .inject import matches

    if is_role(pattern):
        return name in modules_with_role(model, role_name(pattern))
    return matches(name, pattern)


def head_counts(model: nn.Module) -> tuple[int, int] | None:
    """(attention heads, key/value heads) from the model's config, or None when it names neither."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = next((v for k in ("num_attention_heads", "n_head", "num_heads", "heads")
                  if isinstance(v := getattr(config, k, None), int)), None)
    if heads is None:
        return None
    if model_type(model) in ("falcon", "RefinedWeb", "RefinedWebModel"):
        grouped = getattr(config, "new_decoder_architecture", False)
        kv = getattr(config, "num_kv_heads", None) if grouped or not getattr(config, "multi_query", False) else 1
        return heads, kv or heads
    kv = next((v for k in ("num_key_value_heads", "num_kv_heads") if isinstance(v := getattr(config, k, None), int)),
              heads)
    return heads, kv


def qkv_rows(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Output rows of the fused q/k/v projection `name`: {"query": idx, "key": idx, "value": idx}.

    Raises ConfigError naming the module and the architecture when the layout or the head counts cannot
    be told (an unknown model whose fused projection is not one of `_FUSED_NAMES`).
    """
    family = FAMILIES.get(model_type(model) or "")
    layout = family.qkv_layout if family is not None else _FUSED_NAMES.get(name.rsplit(".", 1)[-1])
    if callable(layout):
        layout = layout(getattr(model, "config", None))
    counts = head_counts(model)
    module = model.get_submodule(name)
    d_out = in_out_features(module.base if isinstance(module, AdapterLayer) else module)[1]
    if layout is None or (counts is None and layout != "concat"):
        raise ConfigError(f"cannot tell how {name} of {describe(model)} splits into queries, keys and values; "
                          "name the modules to adapt in `targets` (the whole fused projection is then adapted)")
    heads, kv = counts or (1, 1)
    if d_out % (heads + 2 * kv):
        raise ConfigError(f"{name} of {describe(model)} has {d_out} outputs, not a multiple of {heads} query + "
                          f"2 x {kv} key/value heads; name the modules to adapt in `targets`")
    head_dim = d_out // (heads + 2 * kv)
    if layout == "concat":
        groups, pattern = 1, "q" * heads + "k" * kv + "v" * kv
    elif layout == "per-head":
        groups, pattern = heads, "qkv"
    else:  # grouped: each key/value group's queries, then its key and value
        groups, pattern = kv, "q" * (heads // kv) + "kv"
    labels = torch.tensor([ord(c) for c in pattern * groups]).repeat_interleave(head_dim)  # one per output row
    return {role: torch.nonzero(labels == ord(role[0])).flatten() for role in PROJECTIONS}


def position_limit(model: nn.Module) -> tuple[int, bool] | None:
    """(positions, absolute) for the model: learned absolute position embeddings (GPT-2 `wpe`, BERT/RoBERTa
    `position_embeddings`, OPT `embed_positions`) give a hard limit (True); otherwise the config's
    max_position_embeddings / n_positions, a declared limit only (rotary, ALiBi: False); None when neither.

    RoBERTa numbers positions from padding_idx + 1 and OPT adds an offset of 2, so those are subtracted.
    """
    limits = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and last in ("wpe", "position_embeddings", "embed_positions"):
            offset = getattr(module, "offset", None)
            if not isinstance(offset, int):
                offset = 0 if module.padding_idx is None else module.padding_idx + 1
            limits.append(module.num_embeddings - offset)
    if limits:
        return min(limits), True
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    declared = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return (declared, False) if isinstance(declared, int) else None
