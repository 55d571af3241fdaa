"""LLaMA-Adapter: zero-init gated attention to learned adaption prompts (Zhang et al., 2023,
arXiv:2303.16199); Hugging Face peft calls it `adaption_prompt`.

In each of the top L attention layers, K learned prompt tokens P_l in R^{K x d} are projected by
the layer's own key and value projections; every query also attends to them, with a softmax of its
own, scaled by a gate g_l that starts at zero:

    o = Attn(x) + g_l softmax(q P_l^T W_k^T / sqrt(d_head)) P_l W_v^T,   then   y = W_o o

per head (q after rotary embedding, the prompt keys without it; grouped-query models share the
prompt keys/values of a key head across its query heads). g_l = 0 at init, so the model is
unchanged; P_l ~ N(0, 1) (peft, after the official code's nn.Embedding init).
Trainable: L K d + L. Not mergeable. Prompt keys never enter the KV cache, so `generate` works.

Implementation: the attention module is wrapped (as in peft), but the prompt attention is added to
the input of the output projection W_o through two hooks that act only during the wrapper's own
forward: one keeps the query projection's output, the other adds the prompt term to W_o's input.
Why: peft recomputes the query projection and runs W_o a second time on the prompt term, two extra
(tokens x d x d) products per layer; here the extra work is the K-wide attention only. A consequence
is that W_o's bias (if any) is added once; peft adds it twice (the same for bias-free Llama models).

Choices where methods.md says UNVERIFIED: one scalar gate per layer (peft; the paper's official
code for v1 also uses one per layer, v2 one per head with tanh). Supported: Llama-style attention
(q/k/v/o projections, rotary embeddings passed as `position_embeddings`, no q/k norm): Llama,
SmolLM2, Mistral, Qwen2, Gemma 2 (its query scale `scaling` is used); the default target is the
"attention" role (`core.architectures`), and attention of any other shape is refused naming the module
and its class: fused q/k/v (Phi-3, GPT-NeoX, Falcon, BLOOM, GPT-2), q/k norms (Qwen3, Gemma 3), OPT's
and BERT's. Defaults: K = 10 (the paper's), L = every layer (the paper: 30 of 32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.layer import AdapterLayer
from ..core.model_adapter import ModelAdapter
from ..core.registry import register, register_model_adapter
from .lora import adapter_dtype

ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LlamaAdapterConfig(AdapterConfig):
    """Gated adaption prompts in the top layers' self-attention."""

    method = "llama-adapter"
    paper: ClassVar[str] = "Zhang et al. 2023, arXiv:2303.16199"
    trainable: ClassVar[str] = "L K d + L (K prompt tokens of width d and one gate in each of the top L layers)"

    targets: str | list[str] | None = "role:attention"
    """The attention modules (Llama-style: q_proj, k_proj, v_proj, o_proj and rotary embeddings); by default
    the "attention" role of the model's architecture."""

    adapter_len: int = 10
    """Number K of adaption prompt tokens per layer."""

    adapter_layers: int | None = None
    """Number L of top layers that get prompts; None: every layer."""

    def validate(self) -> None:
        if not isinstance(self.adapter_len, int) or self.adapter_len < 1:
            raise ConfigError(f"adapter_len must be a positive integer, got {self.adapter_len!r}")
        if self.adapter_layers is not None and (not isinstance(self.adapter_layers, int) or self.adapter_layers < 1):
            raise ConfigError(f"adapter_layers must be a positive integer or None (every layer), "
                              f"got {self.adapter_layers!r}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension: the rotation of rotary position embeddings."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(AdapterLayer):
    """A Llama-style attention module plus a gated attention to K learned prompt tokens."""

    mergeable = False
    routes_itself = True  # the o_proj hook weighs the prompt attention per sample

    def __init__(self, base: nn.Module, adapter_len: int) -> None:
        super().__init__(base)
        w = weights.get_weight(base.q_proj)
        kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.head_dim = int(base.head_dim)
        self.scaling = float(getattr(base, "scaling", self.head_dim**-0.5))  # Gemma 2: query_pre_attn_scalar
        self.adaption_prompt = nn.Parameter(torch.zeros(1, adapter_len, w.shape[1], **kw))  # (1, K, d): peft's shape
        self.adaption_gate = nn.Parameter(torch.zeros(1, **kw))
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # set only during adapted_forward
        self._query: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.adaption_prompt)
        nn.init.zeros_(self.adaption_gate)

    def forward(self, *args, **kwargs):
        # transformers' decoder layers pass the attention input by keyword; AdapterLayer takes it first
        if "hidden_states" in kwargs:
            args = (kwargs.pop("hidden_states"), *args)
        return super().forward(*args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs):
        rope = kwargs.get("position_embeddings", args[0] if args else None)
        if rope is None:
            raise ConfigError(f"llama-adapter needs rotary embeddings passed to {type(self.base).__name__} as "
                              "`position_embeddings` (transformers >= 4.48 Llama-style attention)")
        self._rope = rope
        try:
            return self.base(x, *args, **kwargs)
        finally:
            self._rope = self._query = None

    def _keep_query(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._rope is not None:
            self._query = output

    def _add_prompt_attention(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._query is None:
            return None
        query, self._query = self._query, None
        o = args[0]
        extra = self.prompt_attention(query, *self._rope).to(o.dtype)
        share = self.sample_weights(o.shape[0], o.device)  # a mixed-adapter call: its samples only
        if share is not None:
            extra = extra * share.to(o.dtype).view(-1, *[1] * (extra.dim() - 1))
        return (o + extra, *args[1:])

    def prompt_attention(self, query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """g softmax(q_rot K_p^T / sqrt(d_head)) V_p for query projections (b, s, H d_head) -> (b, s, H d_head)."""
        b, s, _ = query.shape
        q = query.view(b, s, -1, self.head_dim)  # (b, s, H, hd)
        q = q * cos.unsqueeze(2) + _rotate_half(q) * sin.unsqueeze(2)
        prompt = self.adaption_prompt[0].to(query.dtype)  # (K, d)
        k = self.base.k_proj(prompt).view(prompt.shape[0], -1, self.head_dim)  # (K, H_kv, hd)
        v = self.base.v_proj(prompt).view(prompt.shape[0], -1, self.head_dim)
        groups = q.shape[2] // k.shape[1]  # query heads per key head
        k = k.repeat_interleave(groups, dim=1).permute(1, 2, 0)  # (H, hd, K)
        v = v.repeat_interleave(groups, dim=1).transpose(0, 1)  # (H, K, hd)
        scores = (q.transpose(1, 2) @ k) * self.scaling  # (b, H, s, K)
        exact = torch.promote_types(scores.dtype, torch.float32)  # softmax in fp32 for half models, as peft
        probs = (self.adaption_gate * torch.softmax(scores, dim=-1, dtype=exact)).to(query.dtype)
        return (probs @ v).transpose(1, 2).reshape(b, s, -1)  # (b, s, H hd)

    def extra_repr(self) -> str:
        return f"adapter_len={self.adaption_prompt.shape[1]}"


@register_model_adapter(LlamaAdapterConfig)
class PromptAttentionHooks(ModelAdapter):
    """Hooks on the projections inside each wrapped attention (modules the layer wraps but does not replace):
    q_proj's output is kept, and o_proj's input gets the gated prompt attention added."""

    def attach(self, model: nn.Module, layers: dict) -> None:
        super().attach(model, layers)
        for layer in layers.values():
            attention = layer.plain_base
            self.hook(attention.q_proj.register_forward_hook(layer._keep_query))
            self.hook(attention.o_proj.register_forward_pre_hook(layer._add_prompt_attention))


@register(LlamaAdapterConfig)
def build(module: nn.Module, cfg: LlamaAdapterConfig, name: str) -> AdaptedAttention | None:
    """Wrap the attention of the top `adapter_layers` layers (None for the layers below them)."""
    missing = [p for p in (*ATTENTION_PARTS, "head_dim", "layer_idx", "config") if not hasattr(module, p)]
    fused = next((n for n in ("qkv_proj", "query_key_value", "c_attn", "qkv", "in_proj") if hasattr(module, n)), None)
    if missing or hasattr(module, "q_norm"):
        why = f"lacks {', '.join(missing)}" if missing else "normalises its queries (q_norm)"
        why += f" (it fuses q, k, v into one `{fused}`)" if fused else ""
        raise ConfigError(f"llama-adapter wraps Llama-style attention (q_proj, k_proj, v_proj, o_proj, rotary "
                          f"embeddings: Llama, SmolLM2, Mistral, Qwen2, Gemma 2); {name} ({type(module).__name__} of a "
                          f"{getattr(getattr(module, 'config', None), 'model_type', 'non-transformers')} model) {why}")
    n_layers = module.config.num_hidden_layers
    top = n_layers if cfg.adapter_layers is None else cfg.adapter_layers
    if top > n_layers:
        raise ConfigError(f"adapter_layers={top} but the model has {n_layers} layers; use at most {n_layers}")
    if module.layer_idx < n_layers - top:
        return None
    return AdaptedAttention(module, cfg.adapter_len)
