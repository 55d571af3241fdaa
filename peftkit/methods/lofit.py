"""LoFiT: localized fine-tuning of attention-head outputs (Yin, Ye, Durrett, 2024, arXiv:2406.01563).

On the input z of each attention output projection (the concatenated head outputs z = [z_1 .. z_H],
heads major: Llama `o_proj`, GPT-2 `attn.c_proj`, GPT-NeoX `attention.dense`, BERT
`attention.output.dense`, timm-style ViT `attn.proj`: the "attn-out" role of `core.architectures`):

    z_h <- (1 + A_h) ⊙ z_h + v_h,      A_h, v_h in R^{d_head}.

Two stages (methods.md 3.3):

* stage 1, `LoFiTConfig()` (heads=None): scalings A on every head, A ~ N(0, init_std²) with init_std
  1e-3, trained with an L1 term λ Σ_h ‖A_h‖₁ (λ = `l1`, added to the loss by the method's schedule, which
  peftkit's loop runs by itself). `select_heads(model, k)` ranks heads by ‖A_h‖₂ (ties: lower layer, then
  lower head first) and returns the top k (layer, head) pairs. Trainable: n_layers n_heads d_head.
* stage 2, `LoFiTConfig(heads=[[layer, head], ...])`: the stage-1 adapter is removed (unload) and only
  offsets v_h (init 0: the identity) on those heads train. Trainable: K d_head for K heads.

    model = lofit_two_stage(model, train, k=32)   # or: apply stage 1, train, select_heads, unload,
                                                  #     apply LoFiTConfig(heads=...), train
    cfg = peftkit.calibrate(model, LoFiTConfig(top_k=32), batches)  # or: stage 1 on `select_steps`
    peftkit.apply(model, cfg)                                        # batches, then stage 2 (peftkit train)

Stage 2 is computed as o_proj(z + v) = W_o z + W_o v: the base output plus one (d_out,) vector per layer,
so a step costs one broadcast add per layer over the frozen model; merging folds W_o v into the base's
bias (a bias-free Llama o_proj gets one, `core.weights.set_bias`; unmerging removes it again). Stage 1
merges too: W_o diag(1 + A). The head count comes from the model's config (num_attention_heads, n_head
or heads) unless `num_heads` is given; `layer` is the first integer in the module name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.apply import adapter_layers_of, apply, get_state, unload
from ..core.architectures import describe
from ..core.calibration import batch_loss
from ..core.config import AdapterConfig, ConfigError
from ..core.inject import layer_index
from ..core.layer import AdapterLayer
from ..core.model_adapter import ModelAdapter
from ..core.registry import register, register_calibration, register_model_adapter
from ..core.schedule import MethodSchedule, register_schedule
from .lora import adapter_dtype

ATTENTION_OUTPUTS = ["role:attn-out"]
"""The attention output projections, resolved per architecture (core/architectures.py)."""

HEAD_COUNT_KEYS = ("num_attention_heads", "n_head", "heads", "num_heads")
"""Model-config attributes that hold the number of attention heads."""


@dataclass
class LoFiTConfig(AdapterConfig):
    """Per-head scalings (stage 1) or offsets on selected heads (stage 2) at the attention output."""

    method = "lofit"
    paper: ClassVar[str] = "Yin, Ye, Durrett 2024, arXiv:2406.01563"
    trainable: ClassVar[str] = "stage 1: n_layers n_heads d_head; stage 2: K d_head for K selected heads"

    targets: str | list[str] | None = field(default_factory=lambda: list(ATTENTION_OUTPUTS))
    """The attention output projections (one per block); their input is the concatenation of the heads."""

    heads: list[list[int]] | None = None
    """Stage 2: the [layer, head] pairs whose offsets v train (e.g. from `select_heads`); None: stage 1."""

    num_heads: int | None = None
    """Attention heads per layer; None: read from the model's config (num_attention_heads, n_head, heads)."""

    init_std: float = 1e-3
    """Stage 1: A ~ N(0, init_std²) (the paper's 1e-3; 0 makes stage 1 the identity at init)."""

    l1: float = 5e-4
    """Stage 1: λ of the loss term λ Σ_h ‖A_h‖₁ (the paper: 5e-4, 1e-3 for 13B models)."""

    top_k: int | None = None
    """Both stages in one config: `peftkit.calibrate` / `peftkit train` run stage 1 for `select_steps` batches,
    keep the top_k heads and return the stage-2 config (the paper: 32 of Llama-2-7B's 1024 heads)."""

    select_steps: int = 100
    """Calibration: stage-1 AdamW steps (one batch each) before the heads are chosen."""

    select_lr: float = 5e-3
    """Calibration: stage-1 learning rate (the paper's 5e-3)."""

    def __post_init__(self) -> None:
        if isinstance(self.heads, list | tuple):  # (layer, head) tuples from select_heads; JSON gives lists
            self.heads = [list(p) if isinstance(p, list | tuple) else p for p in self.heads]
        super().__post_init__()

    def validate(self) -> None:
        if self.heads is not None:
            pairs = self.heads if isinstance(self.heads, list) else []
            if not pairs or not all(_is_pair(p) for p in pairs):
                raise ConfigError(f"heads must be a non-empty list of [layer, head] pairs of non-negative integers "
                                  f"(or None for stage 1), got {self.heads!r}")
            if len({tuple(p) for p in pairs}) != len(pairs):
                raise ConfigError(f"heads lists a [layer, head] pair twice: {self.heads!r}")
        if self.num_heads is not None and (not isinstance(self.num_heads, int) or self.num_heads < 1):
            raise ConfigError(f"num_heads must be a positive integer or None, got {self.num_heads!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k must be a positive integer (heads to keep) or None, got {self.top_k!r}")
        if not isinstance(self.select_steps, int) or self.select_steps < 1 or self.select_lr <= 0:
            raise ConfigError(f"select_steps must be a positive integer and select_lr > 0, got "
                              f"{self.select_steps!r}, {self.select_lr!r}")
        if self.init_std < 0 or self.l1 < 0:
            raise ConfigError(f"init_std and l1 must be >= 0, got init_std={self.init_std}, l1={self.l1}")


def _is_pair(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value))


class LoFiTLayer(AdapterLayer):
    """LoFiT on one attention output projection (nn.Linear or GPT-2 Conv1D)."""

    def __init__(self, base: nn.Module, layer: int, heads: list[int] | None, cfg: LoFiTConfig) -> None:
        super().__init__(base)
        w = weights.get_weight(base)
        self.kw = {"device": w.device, "dtype": adapter_dtype(w)}
        self.layer, self.head_ids, self.init_std = layer, heads, cfg.init_std
        self.num_heads: int | None = cfg.num_heads
        self.head_dim: int | None = None
        if heads is None:
            self.lofit_scale = nn.Parameter(torch.zeros(w.shape[1], **self.kw))  # A, (H d_head)
        else:  # v is (K_layer, d_head): created once the head count is known (`HeadGeometry`)
            self.lofit_offset = nn.Parameter(torch.zeros(len(heads), 0, **self.kw))

    @property
    def stage(self) -> int:
        return 1 if self.head_ids is None else 2

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.stage == 2:
                self.lofit_offset.zero_()
            elif self.init_std > 0:
                self.lofit_scale.normal_(0.0, self.init_std)
            else:
                self.lofit_scale.zero_()

    def learn_heads(self, root: nn.Module) -> None:
        """Learn the head geometry from the model (checking the configured heads against it)."""
        d_in = weights.get_weight(self.base).shape[1]
        heads = self.num_heads or model_head_count(root)
        if d_in % heads:
            raise ConfigError(f"the attention output of layer {self.layer} is {d_in} wide, not a multiple of "
                              f"{heads} heads; set LoFiTConfig(num_heads=...) to the model's head count")
        self.num_heads, self.head_dim = heads, d_in // heads
        _check_heads(root, heads)
        if self.stage == 2 and self.lofit_offset.shape[1] != self.head_dim:
            self.lofit_offset = nn.Parameter(torch.zeros(len(self.head_ids), self.head_dim, **self.kw))
        if self.stage == 2:
            columns = torch.arange(d_in, device=self.kw["device"]).view(heads, -1)[self.head_ids].flatten()
            self.register_buffer("offset_columns", columns, persistent=False)  # the selected heads' features

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.stage == 1:  # z + z ⊙ A in one kernel: 1 + A would round A away in bf16
            return self.base(torch.addcmul(x, x, self.lofit_scale.to(x.dtype)), *args, **kwargs)
        y = self.base(x, *args, **kwargs)
        return y + self.output_shift().to(y.dtype)

    def offsets(self) -> torch.Tensor:
        """v as a full (H d_head,) vector: the trained offsets on the selected heads, zero elsewhere."""
        v = self.lofit_offset
        full = torch.zeros(self.num_heads * self.head_dim, device=v.device, dtype=v.dtype)
        return full.index_copy(0, self.offset_columns, v.flatten())

    def output_shift(self) -> torch.Tensor:
        """W_o v, (d_out,): what the offsets add to every output (stage 2)."""
        if self.head_dim is None:
            raise RuntimeError("LoFiT layer has no head geometry; create it with peftkit.apply")
        v = self.offsets()
        return torch.mv(weights.get_weight(self.base).to(v.dtype), v)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (1 + self.lofit_scale.to(weight.dtype)) if self.stage == 1 else weight

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / (1 + self.lofit_scale.to(weight.dtype)) if self.stage == 1 else weight

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if self.stage == 1:
            return bias
        shift = self.output_shift().float()  # W_o v: a bias even where the base has none
        return shift if bias is None else bias + shift.to(bias.dtype)

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias - self.output_shift().to(bias.dtype) if self.stage == 2 else bias

    def head_norms(self) -> torch.Tensor:
        """‖A_h‖₂ per head, (H,) (stage 1)."""
        return self.lofit_scale.detach().double().view(self.num_heads, -1).norm(dim=1)

    def extra_repr(self) -> str:
        what = "scalings on all heads" if self.stage == 1 else f"offsets on heads {self.head_ids}"
        return f"layer={self.layer}, {what}"


def model_head_count(root: nn.Module) -> int:
    """The model's number of attention heads, from its config."""
    config = getattr(root, "config", None)
    for key in HEAD_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"LoFiT cannot find the number of attention heads of {type(root).__name__} (no config "
                      f"attribute {', '.join(HEAD_COUNT_KEYS)}); pass LoFiTConfig(num_heads=...)")


def _check_heads(root: nn.Module, num_heads: int) -> None:
    """One adapted module per block, and every configured head inside an adapted block's range."""
    state = get_state(root)
    blocks = [layer_index(n) for n in state.adapted]
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"LoFiT adapts one attention output per block, but targets {state.config.targets} "
                          f"matched several in one block of {describe(root)}: {state.adapted} (an encoder-decoder "
                          "numbers both stacks' blocks from 0); name one stack's modules in `targets`")
    for block, head in state.config.heads or []:
        if head >= num_heads:
            raise ConfigError(f"heads names head {head} of layer {block}, but the model has {num_heads} heads "
                              f"per layer (0..{num_heads - 1})")
        if block not in blocks:
            raise ConfigError(f"heads names layer {block}, but no attention output matched targets "
                              f"{state.config.targets} there (adapted layers: {sorted(blocks)})")


@register_model_adapter(LoFiTConfig)
class HeadGeometry(ModelAdapter):
    """The head count and width come from the model: each layer learns them when the adapter attaches."""

    def attach(self, model: nn.Module, layers: dict) -> None:
        super().attach(model, layers)
        for layer in layers.values():
            layer.learn_heads(model)


@register(LoFiTConfig)
def build(module: nn.Module, cfg: LoFiTConfig, name: str) -> LoFiTLayer | None:
    """Wrap an attention output projection; in stage 2 only those of blocks with selected heads."""
    if not weights.is_linear(module):
        return None
    block = layer_index(name)
    if block is None:
        raise ConfigError(f"LoFiT places heads by block index, and {name} has no integer in its name; "
                          "target the attention output projections inside the blocks")
    if cfg.heads is None:
        return LoFiTLayer(module, block, None, cfg)
    mine = sorted(head for layer, head in cfg.heads if layer == block)
    return LoFiTLayer(module, block, mine, cfg) if mine else None


def select_heads(model: nn.Module, k: int) -> list[tuple[int, int]]:
    """The k heads with the largest ‖A_h‖₂ of a stage-1 LoFiT adapter, as (layer, head), best first.

    Deterministic: equal norms are ordered by layer, then head.
    """
    layers = [m for m in adapter_layers_of(model) if isinstance(m, LoFiTLayer) and m.stage == 1]
    if not layers:
        raise ConfigError("select_heads needs a stage-1 LoFiT adapter: peftkit.apply(model, LoFiTConfig()), train")
    ranked = sorted((-norm, m.layer, h) for m in layers for h, norm in enumerate(m.head_norms().tolist()))
    if not isinstance(k, int) or not 1 <= k <= len(ranked):
        raise ConfigError(f"k must be an integer in 1..{len(ranked)} (the model's heads), got {k!r}")
    return [(layer, head) for _, layer, head in ranked[:k]]


def lofit_two_stage(model: nn.Module, train: Callable[[nn.Module], object], k: int,
                    stage1: LoFiTConfig | None = None, stage2: LoFiTConfig | None = None) -> list[tuple[int, int]]:
    """Run both LoFiT stages on `model` in place; returns the selected heads.

    `train(model)` trains the model's trainable parameters (e.g. `peftkit.train.train(model, ...)`, which
    adds stage 1's L1 term by itself). Stage 1 applies `stage1` (default `LoFiTConfig()`), trains, keeps the
    top-k heads by ‖A_h‖₂ and unloads (A is discarded, as in the paper); stage 2 applies `stage2` (default
    `LoFiTConfig()`) with those heads and trains again. The model ends with the stage-2 adapter on it.
    """
    stage1 = stage1 or LoFiTConfig()
    if stage1.heads is not None:
        raise ConfigError("stage1 must be a stage-1 config (heads=None)")
    apply(model, stage1)
    train(model)
    heads = select_heads(model, k)
    unload(model)
    apply(model, (stage2 or LoFiTConfig()).replace(heads=[list(h) for h in heads]))
    train(model)
    return heads


@register_calibration(LoFiTConfig)
def calibrate(model: nn.Module, cfg: LoFiTConfig, batches: Iterable) -> LoFiTConfig:
    """With `top_k` and no `heads`: stage 1 on `select_steps` batches, then the stage-2 config of the top_k heads.

    Stage 1 trains A (and the config's modules_to_save, e.g. a fresh classifier head, so the heads are
    ranked for a working classifier) with AdamW at `select_lr` and the L1 term, in train mode; the
    stage-1 adapter is then unloaded, which restores every trained module, so the model is unchanged.
    """
    if cfg.heads is not None or cfg.top_k is None:
        return cfg
    apply(model, cfg)
    was_training = model.training
    try:
        select_heads(model, cfg.top_k)  # a top_k larger than the model's heads fails now, not after training
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.select_lr, weight_decay=0.0)
        penalty = LoFiTL1(model, cfg.l1)
        for batch in itertools.islice(batches, cfg.select_steps):
            loss = batch_loss(model, batch) + penalty.extra_loss(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        heads = select_heads(model, cfg.top_k)
    finally:
        unload(model)
        model.train(was_training)
    return cfg.replace(heads=[list(h) for h in heads])


class LoFiTL1(MethodSchedule):
    """Stage 1's sparsity term λ Σ_h ‖A_h‖₁ = λ Σ |A| over every adapted layer."""

    def __init__(self, model: nn.Module, weight: float) -> None:
        super().__init__(model)
        self.weight = weight
        self.scales = [m.lofit_scale for m in adapter_layers_of(model) if isinstance(m, LoFiTLayer) and m.stage == 1]

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return self.weight * torch.stack([a.abs().sum() for a in self.scales]).sum()


@register_schedule(LoFiTConfig)
def make_schedule(model: nn.Module, cfg: LoFiTConfig, total_steps: int | None) -> LoFiTL1 | None:
    """Stage 1 with l1 > 0 adds the L1 term; stage 2 needs no per-step work."""
    return LoFiTL1(model, cfg.l1) if cfg.heads is None and cfg.l1 > 0 else None
