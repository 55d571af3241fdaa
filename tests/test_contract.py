"""The contract every registered method keeps, as one matrix: method x tiny model.

Each row says how to configure the method on a model, the closed-form trainable count, whether the
method is the identity at init / mergeable / can be disabled, and its tolerances. The checks are the
same for every row; there are no `if method == ...` branches. A registered method without a row
fails `test_every_registered_method_has_a_row`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core import weights
from peftkit.core.apply import get_state
from peftkit.core.inject import find_targets
from peftkit.methods.adalora import AdaLoRAConfig
from peftkit.methods.bone import BoneConfig
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.dept import DePTConfig
from peftkit.methods.difffit import DiffFitConfig
from peftkit.methods.dsee import DSEEConfig
from peftkit.methods.hydra import HydraConfig
from peftkit.methods.increlora import IncreLoRAConfig
from peftkit.methods.kronecker import DiffuseKronAConfig
from peftkit.methods.llama_adapter import LlamaAdapterConfig
from peftkit.methods.lofit import LoFiTConfig
from peftkit.methods.loldu import LoLDUConfig
from peftkit.methods.p_tuning import PTuningConfig
from peftkit.methods.pego import PEGOConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig, kv_shape
from peftkit.methods.randlora import RandLoRAConfig
from peftkit.methods.selective import BitFitConfig, LNTuningConfig
from peftkit.methods.spiel import SpIELConfig
from peftkit.methods.spt import SPTConfig, spt_plan
from peftkit.methods.ssf import SSFConfig
from peftkit.methods.svfit import SVFitConfig
from peftkit.methods.triadaptlora import TriAdaptLoRAConfig
from peftkit.methods.vqt import VQTConfig

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
    from peftkit.core.inject import matches

    total = 0
    for name in find_targets(model, cfg):
        d_in, d_out = weights.in_out_features(model.get_submodule(name))
        total += d_in if any(matches(name, p) for p in cfg.feedforward) else d_out
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


@dataclass
class Row:
    """One method on one tiny model."""

    config: Callable[[], peftkit.AdapterConfig]
    model: str
    count: Callable
    identity_at_init: bool = True
    mergeable: bool = True
    can_disable: bool = True
    trains_base: bool = False
    """The method keeps no copy of the base weights it trains (full fine-tuning): unload keeps them."""
    atol: float = 1e-5
    bf16: bool = True
    merge_adds_bias: bool = False
    """Merging gives bias-free layers a bias (LoFiT's W_o v on Llama): the merged, unloaded model has those keys."""
    id: str = ""
    extra: dict = field(default_factory=dict)


LLM = ("llama", "gpt2", "bert")
ROWS = [
    *[Row(lambda: peftkit.LoRAConfig(r=4, alpha=8), m, lora_count) for m in ("mlp", *LLM)],
    Row(lambda: peftkit.LoRAConfig(r=2, targets=["conv1", "conv2"]), "cnn", lora_count),
    Row(lambda: peftkit.LoRAConfig(r=4, targets=["embed_tokens", "q_proj"], rslora=True), "llama", lora_count,
        id="lora-embedding-rslora"),
    Row(lambda: peftkit.LoRAConfig(r=4, init="gaussian", dropout=0.1, layers=[1]), "llama", lora_count,
        id="lora-gaussian-layers"),
    Row(lambda: peftkit.LoRAConfig(r=4, init="pissa", targets=["q_proj", "v_proj"]), "llama", lora_count,
        identity_at_init=True, atol=2e-5, id="lora-pissa"),
    Row(lambda: peftkit.LoRAConfig(r=4, init="olora", targets=["c_attn"]), "gpt2", lora_count, atol=2e-5,
        id="lora-olora"),
    *[Row(lambda: peftkit.DoRAConfig(r=4, alpha=8), m, dora_count) for m in ("mlp", *LLM)],
    Row(lambda: peftkit.IA3Config(targets=["fc1", "fc2"], feedforward=["fc2"]), "mlp", ia3_count),
    *[Row(lambda: peftkit.IA3Config(), m, ia3_count) for m in LLM],
    *[Row(lambda: peftkit.PromptTuningConfig(num_virtual_tokens=3), m, prompt_count, identity_at_init=False,
          mergeable=False) for m in LLM],
    *[Row(lambda: PrefixTuningConfig(num_virtual_tokens=3), m, prefix_count, identity_at_init=False, mergeable=False)
      for m in LLM],
    Row(lambda: PrefixTuningConfig(num_virtual_tokens=2, projection=True, projection_hidden=8), "gpt2", prefix_count,
        identity_at_init=False, mergeable=False, id="prefix-tuning-projection-gpt2"),
    Row(lambda: PrefixTuningConfig(num_virtual_tokens=2, init="random", shift_positions=False), "llama", prefix_count,
        identity_at_init=False, mergeable=False, id="prefix-tuning-random-unshifted-llama"),
    *[Row(lambda: PTuningConfig(num_virtual_tokens=3, encoder_hidden=8), m, p_tuning_count, identity_at_init=False,
          mergeable=False) for m in LLM],
    Row(lambda: PTuningConfig(num_virtual_tokens=2, encoder="lstm", encoder_hidden=4), "llama", p_tuning_count,
        identity_at_init=False, mergeable=False, id="p-tuning-lstm-llama"),
    *[Row(lambda: DePTConfig(num_virtual_tokens=2, r=2, max_length=8), m, dept_count, identity_at_init=False,
          mergeable=False) for m in LLM],
    Row(lambda: DePTConfig(num_virtual_tokens=0, r=2, max_length=4, init="random"), "llama", dept_count,
        mergeable=False, id="dept-no-prompt-short-s-llama"),  # B = 0 and m = 0: the base model; 6 tokens > s = 4
    *[Row(lambda: SVFitConfig(r=4), m, svfit_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: SVFitConfig(energy=0.9), "llama", svfit_count, id="svfit-energy"),
    *[Row(lambda: LoLDUConfig(r=4, alpha=4), m, loldu_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: LoLDUConfig(train_scale=True, init="normal"), "gpt2", loldu_count, id="loldu-fullrank-scale"),
    *[Row(lambda: DSEEConfig(r=4, num_sparse=8), m, dsee_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: DSEEConfig(r=2, num_sparse=5, support="svd", targets=["c_attn"]), "gpt2", dsee_count, id="dsee-svd"),
    *[Row(lambda: PEGOConfig(r=2, num_modules=3, alpha=4.0), m, pego_count) for m in ("mlp", "llama", "gpt2")],
    *[Row(lambda: SSFConfig(init_std=0.0), m, ssf_count) for m in ("mlp", *LLM)],
    Row(lambda: SSFConfig(init_std=0.0, targets=["conv1", "conv2"]), "cnn", ssf_count),
    Row(lambda: SSFConfig(), "bert", ssf_count, identity_at_init=False, id="ssf-paper-init"),
    Row(lambda: SSFConfig(init_std=0.0, targets=["input-embeddings", "all-norms", "q_proj"], bias_free_shift=True),
        "llama", ssf_count, mergeable=False, id="ssf-llama-shift-everywhere"),
    *[Row(lambda: DiffFitConfig(), m, difffit_count) for m in LLM],
    Row(lambda: DiffFitConfig(targets=["fc2"], per_channel=True), "mlp", difffit_count),
    Row(lambda: DiffFitConfig(targets=["conv2"]), "cnn", difffit_count),
    Row(lambda: DiffFitConfig(per_channel=True, layers=[1]), "gpt2", difffit_count, id="difffit-vector-layers"),
    Row(lambda: SSFConfig(init_std=0.0, targets=["all-linear", "all-norms", "patch_embed.proj"]), "vit", ssf_count,
        id="ssf-vit-paper-placement"),
    Row(lambda: DiffFitConfig(), "vit", difffit_count),
    *[Row(lambda: BitFitConfig(), m, bias_count) for m in ("mlp", "bert", "gpt2", "cnn")],
    *[Row(lambda: LNTuningConfig(), m, norm_count) for m in LLM],
    *[Row(lambda: RandLoRAConfig(r=4, alpha=8), m, randlora_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: RandLoRAConfig(r=3, alpha=6, bases="sparse", targets=["q_proj", "down_proj"]), "llama",
        randlora_count, id="randlora-sparse"),
    *[Row(lambda: DiffuseKronAConfig(alpha=2.0), m, kron_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: DiffuseKronAConfig(a1=4, a2=2, targets=["q_proj", "up_proj"]), "llama", kron_count,
        id="diffusekrona-fixed-factors"),
    *[Row(lambda r=r: BoneConfig(r=r), m, bone_count)
      for m, r in (("mlp", 4), ("llama", 8), ("gpt2", 8), ("bert", 8))],  # r divides every adapted shape
    Row(lambda: BoneConfig(r=16, targets=["q_proj", "down_proj"], layers=[0]), "llama", bone_count,
        id="bone-r16-layers"),
    *[Row(lambda: HydraConfig(r=2, seq_r=3, scaling=0.5), m, hydra_count) for m in ("mlp", "vit", *LLM)],
    Row(lambda: HydraConfig(r=2, dropout=0.2, targets="all-linear"), "gpt2", hydra_count, id="hydra-dropout-all"),
    *[Row(lambda k=k: BottleneckConfig(kind=k, bottleneck=4), m, bottleneck_count, mergeable=False,
          id=f"adapter-{k}-{m}") for k in ("houlsby", "pfeiffer", "parallel") for m in LLM
      if (k, m) != ("parallel", "bert")],  # BERT's feed-forward has no single module to run alongside
    Row(lambda: BottleneckConfig(kind="parallel", bottleneck=4, activation="silu", scaling=2.0, layers=[1]), "llama",
        bottleneck_count, mergeable=False, id="adapter-parallel-silu-layers"),
    Row(lambda: LlamaAdapterConfig(adapter_len=3, adapter_layers=1), "llama", llama_adapter_count, mergeable=False),
    *[Row(lambda: SpIELConfig(density=0.1), m, spiel_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: SpIELConfig(density=0.02, targets=["q_proj", "down_proj"], reselection_decay="cosine"), "llama",
        spiel_count, id="spiel-targets-cosine"),
    *[Row(lambda: LoFiTConfig(heads=[[0, 1], [1, 0], [1, 1]]), m, lofit_count, merge_adds_bias=m == "llama")
      for m in ("llama", "gpt2", "bert", "vit")],
    Row(lambda: LoFiTConfig(heads=[[1, 0]]), "llama", lofit_count, merge_adds_bias=True, id="lofit-one-layer-llama"),
    *[Row(lambda: LoFiTConfig(), m, lofit_count, identity_at_init=False, id=f"lofit-stage1-{m}") for m in ("llama", "gpt2")],
    *[Row(lambda: peftkit.FullFineTuneConfig(), m, full_count, can_disable=False, trains_base=True)
      for m in ("mlp", "llama")],
    *[Row(lambda: peftkit.HeadOnlyConfig(), m, head_count) for m in ("mlp", "bert", "cnn", "gpt2")],
    *[Row(lambda: AdaLoRAConfig(init_r=4, target_r=2), m, adalora_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: AdaLoRAConfig(init_r=3, target_r=1, dropout=0.1, targets=["q_proj", "down_proj"]), "llama",
        adalora_count, id="adalora-dropout-targets"),
    *[Row(lambda: IncreLoRAConfig(target_rank=4), m, increlora_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: IncreLoRAConfig(target_rank=2, max_r=6, advance_learning=False, dropout=0.1, targets=["q_proj"]),
        "llama", increlora_count, id="increlora-no-reserve-dropout"),
    *[Row(lambda: TriAdaptLoRAConfig(target_rank=4), m, triadaptlora_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: TriAdaptLoRAConfig(target_rank=2, max_r=5, threshold="cosine", dropout=0.1, targets=["v_proj"]),
        "llama", triadaptlora_count, id="triadaptlora-cosine-dropout"),
    Row(lambda: spt_planned("vit", budget=500), "vit", spt_count),
    Row(lambda: spt_planned("mlp", budget=150), "mlp", spt_count),
    Row(lambda: spt_planned("gpt2", budget=400), "gpt2", spt_count),
    Row(lambda: VQTConfig(num_queries=2), "vit", vqt_count, identity_at_init=False, mergeable=False),
]


def _row_id(row: Row) -> str:
    return row.id or f"{row.config().method}-{row.model}"


def setup_row(row: Row, seed: int = 0):
    model = MODELS[row.model](seed)
    inputs = example_inputs(row.model)
    with torch.no_grad():
        base_out = output_of(model, inputs)
    base_state = copy.deepcopy(model.state_dict())
    peftkit.apply(model, row.config())
    return model, inputs, base_out, base_state


def perturb(model, scale: float = 0.1, seed: int = 3) -> None:
    """Move every trainable parameter away from its init so that later checks can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


rows = pytest.mark.parametrize("row", ROWS, ids=_row_id)


def test_every_registered_method_has_a_row():
    covered = {row.config().method for row in ROWS}
    assert set(peftkit.registered_methods()) <= covered, set(peftkit.registered_methods()) - covered


@rows
def test_identity_at_init(row):
    if not row.identity_at_init:
        pytest.skip("not the identity at init by definition")
    model, inputs, base_out, _ = setup_row(row)
    with torch.no_grad():
        out = output_of(model, inputs)
    torch.testing.assert_close(out, base_out, atol=row.atol, rtol=0)


@rows
def test_merge_equals_unmerged_and_unmerge_restores(row):
    model, inputs, _, base_state = setup_row(row)
    perturb(model)
    with torch.no_grad():
        unmerged = output_of(model, inputs)
        if not row.mergeable:
            with pytest.raises(peftkit.MergeError):
                peftkit.merge(model)
            return
        peftkit.merge(model)
        merged = output_of(model, inputs)
        peftkit.unmerge(model)
        again = output_of(model, inputs)
    torch.testing.assert_close(merged, unmerged, atol=row.atol, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=row.atol, rtol=0)
    if row.trains_base:
        return
    peftkit.unload(model)  # unmerged unload puts the original base weights back
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, base_state[k], atol=row.atol, rtol=0)


@rows
def test_merge_then_unload_is_a_plain_model_with_same_outputs(row):
    if not row.mergeable:
        pytest.skip("not mergeable")
    model, inputs, _, base_state = setup_row(row)
    perturb(model)
    with torch.no_grad():
        adapted = output_of(model, inputs)
        plain = peftkit.unload(peftkit.merge(model))
        out = output_of(plain, inputs)
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in plain.modules())
    added = {k for k in plain.state_dict() if k.endswith(".bias")} - set(base_state) if row.merge_adds_bias else set()
    assert set(plain.state_dict()) - added == set(base_state) and (added or not row.merge_adds_bias)
    assert not hasattr(plain, "peftkit_state")
    torch.testing.assert_close(out, adapted, atol=row.atol, rtol=0)


@rows
def test_save_load_round_trip(row, tmp_path):
    model, inputs, _, _ = setup_row(row)
    perturb(model)
    with torch.no_grad():
        expected = output_of(model, inputs)
    peftkit.save(model, tmp_path)
    fresh = peftkit.load(MODELS[row.model](0), tmp_path)
    with torch.no_grad():
        out = output_of(fresh, inputs)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@rows
def test_only_adapter_parameters_train(row):
    model, inputs, _, _ = setup_row(row)
    perturb(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the method made nothing trainable"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    output_of(model, inputs).float().pow(2).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, f"frozen {n} received a gradient"
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)


@rows
def test_trainable_count_matches_formula(row):
    model = MODELS[row.model](0)
    cfg = row.config()
    expected = row.count(model, cfg)
    peftkit.apply(model, cfg)
    assert peftkit.trainable_parameters(model).trainable == expected


@rows
def test_disabled_equals_base(row):
    model, inputs, base_out, _ = setup_row(row)
    perturb(model)
    if not row.can_disable:
        with pytest.raises(peftkit.ConfigError):
            with peftkit.disabled(model):
                pass
        return
    with torch.no_grad(), peftkit.disabled(model):
        out = output_of(model, inputs)
    torch.testing.assert_close(out, base_out, atol=1e-6, rtol=0)
    with torch.no_grad():
        again = output_of(model, inputs)
    assert again.shape != base_out.shape or not torch.allclose(again, base_out), "re-enabling failed"


@rows
def test_bf16_runs(row):
    if not row.bf16:
        pytest.skip("bf16 not supported")
    model, inputs, base_out, _ = setup_row(row)
    perturb(model)
    model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    out = output_of(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()


@rows
def test_applying_twice_raises_unless_replace(row):
    model, _, _, _ = setup_row(row)
    with pytest.raises(peftkit.ConfigError, match="already has a peftkit adapter"):
        peftkit.apply(model, row.config())
    peftkit.apply(model, row.config(), replace=True)
    assert get_state(model).config.method == row.config().method
