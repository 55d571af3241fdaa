"""The closed-form trainable-parameter count of every method, as the contract matrix checks it.

Each function takes the tiny model (before `apply`) and the config, and computes the count from the
paper's formula and the model's shapes, independently of the method's implementation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from peftkit.core import weights
from peftkit.core.inject import find_targets
from peftkit.methods.prefix_tuning import kv_shape
from peftkit.methods.spt import SPTConfig, spt_plan

from tiny_models import MODELS, example_inputs, output_of


def _adapted(model, cfg) -> list[nn.Module]:
    return [model.get_submodule(n) for n in find_targets(model, cfg)]


def lora_count(model, cfg) -> int:
    total = 0
    for m in _adapted(model, cfg):
        kind, w = weights.layer_kind(m), weights.get_weight(m)
        if kind == "conv2d":
            total += cfg.r * (w.shape[1] * w.shape[2] * w.shape[3] + w.shape[0])
        elif kind is not None:
            total += cfg.r * (w.shape[0] + w.shape[1])
    return total


def dora_count(model, cfg) -> int:
    return lora_count(model, cfg) + sum(weights.get_weight(m).shape[0] for m in _adapted(model, cfg))


def ia3_count(model, cfg) -> int:
    """d_in per input-scaled module, d_out per output-scaled one; a fused q/k/v projection selected through
    the key/value roles counts its key and value rows only."""
    from peftkit.core import architectures as arch

    total = 0
    for name in find_targets(model, cfg):
        d_in, d_out = weights.in_out_features(model.get_submodule(name))
        roles = [r for r in arch.PROJECTIONS if f"role:{r}" in cfg.targets and name in arch.modules_with_role(model, r)]
        if any(arch.matches_target(model, name, p) for p in cfg.feedforward):
            total += d_in
        elif roles and name in arch.modules_with_role(model, "qkv"):
            total += sum(len(arch.qkv_rows(model, name)[r]) for r in roles)
        else:
            total += d_out
    return total


def svfit_count(model, cfg) -> int:
    """r per layer; with r=None the smallest r whose top singular values hold `energy` of sum s^2."""
    total = 0
    for m in _adapted(model, cfg):
        s2 = torch.linalg.svdvals(weights.get_weight(m).double()).pow(2)
        total += cfg.r or next(i + 1 for i in range(len(s2)) if s2[: i + 1].sum() >= cfg.energy * s2.sum() - 1e-12)
    return total


def loldu_count(model, cfg) -> int:
    """r per layer (full rank min(d_in, d_out) with r=None), plus the scale with train_scale."""
    return sum((cfg.r or min(weights.get_weight(m).shape)) + cfg.train_scale for m in _adapted(model, cfg))


def _channels(m) -> int | None:
    """Output channels of an SSF insertion point (None: not a supported module)."""
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if weights.is_linear(m):
        return weights.in_out_features(m)[1]
    w = getattr(m, "weight", None)  # LayerNorm / RMSNorm
    return w.numel() if isinstance(w, torch.Tensor) and w.ndim == 1 else None


def ssf_count(model, cfg) -> int:
    """2 x channels per insertion point with a bias; 1 x without one unless bias_free_shift."""
    total = 0
    for m in _adapted(model, cfg):
        channels = _channels(m)
        if channels is not None:
            total += channels * (2 if getattr(m, "bias", None) is not None or cfg.bias_free_shift else 1)
    return total


def _outside_heads(model) -> list[tuple[str, nn.Module]]:
    from peftkit.core.inject import head_module_names

    heads = head_module_names(model)
    return [(n, m) for n, m in model.named_modules() if not any(n == h or n.startswith(h + ".") for h in heads)]


def _biases(model) -> list[nn.Parameter]:
    return [m.bias for _, m in _outside_heads(model) if isinstance(getattr(m, "bias", None), nn.Parameter)]


def _norm_parameters(model) -> list[nn.Parameter]:
    norms = [m for _, m in _outside_heads(model) if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]
    return [p for m in norms for p in m.parameters()]


def bias_count(model, cfg) -> int:
    """Every bias outside the head."""
    return sum(p.numel() for p in _biases(model))


def norm_count(model, cfg) -> int:
    """Every LayerNorm / RMSNorm parameter outside the head."""
    return sum(p.numel() for p in _norm_parameters(model))


def difffit_count(model, cfg) -> int:
    """Biases and norm parameters (a LayerNorm's bias once) + 1 (or d_out) per scaled branch."""
    scales = sum(_channels(m) if cfg.per_channel else 1 for m in _adapted(model, cfg))
    return sum(p.numel() for p in {id(p): p for p in _biases(model) + _norm_parameters(model)}.values()) + scales


def randlora_count(model, cfg) -> int:
    """N (r + d_min) per layer, N = ceil(d_min / r)."""
    total = 0
    for m in _adapted(model, cfg):
        d_min = min(weights.get_weight(m).shape)
        total += -(-d_min // cfg.r) * (cfg.r + d_min)
    return total


def kron_count(model, cfg) -> int:
    """a1 a2 + b1 b2 per layer (a1 b1 = d_out, a2 b2 = d_in)."""
    total = 0
    for m in _adapted(model, cfg):
        d_out, d_in = weights.get_weight(m).shape
        a1, a2 = cfg.shapes_for(d_out, d_in)
        total += a1 * a2 + (d_out // a1) * (d_in // a2)
    return total


def dsee_count(model, cfg) -> int:
    return sum(cfg.r * sum(weights.in_out_features(m)) + cfg.num_sparse for m in _adapted(model, cfg))


def pego_count(model, cfg) -> int:
    return sum(cfg.num_modules * cfg.r * sum(weights.in_out_features(m)) for m in _adapted(model, cfg))


def bottleneck_count(model, cfg) -> int:
    d, m = model.config.hidden_size, cfg.bottleneck  # every default target is d wide in and out
    return len(find_targets(model, cfg)) * (2 * d * m + m + d)


def llama_adapter_count(model, cfg) -> int:
    layers = cfg.adapter_layers or model.config.num_hidden_layers
    return layers * (cfg.adapter_len * model.config.hidden_size + 1)


def bone_count(model, cfg) -> int:
    return sum(weights.in_out_features(m)[1] * cfg.r for m in _adapted(model, cfg))


def hydra_count(model, cfg) -> int:
    r, r_s, total = cfg.r, cfg.seq_r or cfg.r, 0
    for m in filter(weights.is_linear, _adapted(model, cfg)):  # ViT's patch_embed.proj (a conv) is not adapted
        d_in, d_out = weights.in_out_features(m)
        total += r * (d_in + d_out) + 2 * r_s * d_out
        total += (r + r_s + 2 * d_out) if weights.get_bias(m) is not None else 0  # branch biases a, c
    return total


def adalora_count(model, cfg) -> int:
    return sum(cfg.init_r * (sum(weights.in_out_features(m)) + 1) for m in _adapted(model, cfg))


def increlora_count(model, cfg) -> int:
    shapes = [weights.in_out_features(m) for m in _adapted(model, cfg)]
    return sum(cfg.max_r_for(d_in, d_out) * (d_in + d_out + 1) for d_in, d_out in shapes)  # preallocated slots


def triadaptlora_count(model, cfg) -> int:
    from peftkit.methods.increlora import chunk_sizes

    total = 0
    for d_in, d_out in (weights.in_out_features(m) for m in _adapted(model, cfg)):
        sizes = chunk_sizes(cfg.init_r, cfg.rank_step_value(), cfg.max_r_for(d_in, d_out))
        total += sum(k * (d_in + d_out + 2 * sum(sizes[: i + 1])) for i, k in enumerate(sizes))  # A, B, L and U blocks
    return total


def prompt_count(model, cfg) -> int:
    return cfg.num_virtual_tokens * model.get_input_embeddings().weight.shape[1]


def prefix_count(model, cfg) -> int:
    """2 L n d_kv; with the MLP: n d + d h + h + 2 L d_kv (h + 1)."""
    layers, heads, head_dim = kv_shape(model)
    width, d, n = 2 * layers * heads * head_dim, model.config.hidden_size, cfg.num_virtual_tokens
    if not cfg.projection:
        return n * width
    h = cfg.projection_hidden or d
    return n * d + d * h + h + width * (h + 1)


def p_tuning_count(model, cfg) -> int:
    """n d + encoder: MLP d-h-h-d, or a bidirectional LSTM (4 gates, two biases) and a 2h-2h-d head."""
    d, n = model.config.hidden_size, cfg.num_virtual_tokens
    h = cfg.encoder_hidden or d
    if cfg.encoder == "mlp":
        return n * d + (d * h + h) + (h * h + h) + (h * d + d)
    lstm = sum(2 * 4 * h * ((d if i == 0 else 2 * h) + h + 2) for i in range(cfg.encoder_layers))
    return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def dept_count(model, cfg) -> int:
    """m d + s r + r d."""
    d = model.config.hidden_size
    return cfg.num_virtual_tokens * d + cfg.max_length * cfg.r + cfg.r * d


def spiel_count(model, cfg) -> int:
    """round(density d_out d_in) per adapted linear layer."""
    return sum(round(cfg.density * weights.get_weight(m).numel()) for m in _adapted(model, cfg) if weights.is_linear(m))


def lofit_count(model, cfg) -> int:
    """Stage 1: n_heads d_head per layer (the output projection's input width); stage 2: K d_head."""
    widths = [weights.in_out_features(m)[0] for m in _adapted(model, cfg)]
    if cfg.heads is None:
        return sum(widths)
    heads = getattr(model.config, "num_attention_heads", None) or model.config.heads
    return len(cfg.heads) * (widths[0] // heads)


def spt_planned(model: str, budget: int, r: int = 2) -> SPTConfig:
    """SPT planned on MODELS[model](0) from two fixed batches (loss: mean squared output), as spt_plan does."""
    batches = [example_inputs(model, batch=4, seed=s) for s in (11, 12)]
    loss = lambda net, batch: output_of(net, batch).float().pow(2).mean()  # noqa: E731
    return spt_plan(MODELS[model](0), batches, SPTConfig(budget=budget, r=r), loss_fn=loss)


def spt_count(model, cfg) -> int:
    """r (d_in + d_out) per LoRA matrix + planned entries per sparse matrix + whole planned vectors."""
    params, plan = dict(model.named_parameters()), cfg.plan
    lora = sum(cfg.r * sum(params[f"{n}.weight"].shape) for n in plan["lora"])
    return lora + sum(map(len, plan["sparse"].values())) + sum(params[n].numel() for n in plan["vectors"])


def vqt_count(model, cfg) -> int:
    """L T d queries + a new head on the class token and the L T summaries: (d_c + L T d) C + C."""
    layers, d = len(model.blocks), model.blocks[0].attn.qkv.in_features
    d_c, classes = model.head.in_features, model.head.out_features
    summaries = layers * cfg.num_queries * d
    return summaries + (d_c + summaries) * classes + classes


def full_count(model, cfg) -> int:
    return sum(p.numel() for p in model.parameters())


def head_count(model, cfg) -> int:
    from peftkit.core.inject import head_module_names

    heads = head_module_names(model)
    return sum(p.numel() for n, m in model.named_modules() if n in heads for p in m.parameters(recurse=False))
