"""VQT: visual query tuning (Tu, Mai, Chao, 2023, arXiv:2212.03220).

At every block ℓ of a frozen pre-norm ViT, T learnable query tokens Q_ℓ (T, d) summarise the block's
input tokens X_ℓ. Z = [Q_ℓ; X_ℓ] goes through the block with attention keys and values from X_ℓ only:

    u   = Q_ℓ + proj(softmax(norm1(Q_ℓ) W_q (norm1(X_ℓ) W_k)^T / √d_h) norm1(X_ℓ) W_v)     (per head)
    s_ℓ = u + mlp(norm2(u))                       (T, d): layer ℓ's summary
    X_{ℓ+1} = block_ℓ(X_ℓ)                        the frozen model's own forward, untouched

The original tokens never see the queries, so every X_ℓ, and the model's features, are exactly the
frozen model's. A new linear head reads the summaries and the final class token (Head2Toe style):

    logits = W [n(c); n(flat s_1); ...; n(flat s_L)] + b,    n(v) = v / ||v||  (`normalize_features`)

where c is what the model's head reads (peftkit's ViT: the class token after the final norm).
Trainable: L T d + (d_c + L T d) C + C (queries, new head). Not mergeable (the base is untouched; the
head is new), and not the identity at init (the new head replaces the model's).

How the method takes over the model's forward (no wrapper around the user's model):

* the block container (`targets`, "blocks") is wrapped by `VQTBlocks`. Its forward runs each block
  under `torch.no_grad()`, so the backbone stores no activations for a backward it never gets, and
  keeps that block's qkv output (a forward hook). Then, with grad enabled, it runs the query rows
  through the same norm1, query projection, attention, proj, norm2 and mlp, with keys and values
  copied from that detached qkv output. The query path of layer ℓ saves only small (T-token)
  activations and that copy of K, V (2 N d per image), and depends on no layer after ℓ. Measured peak
  memory of a training step on vit-fmnist (forward + backward, storages created during the step,
  batch 32 and 128): 0.30x that of LoRA r8 on qkv / attn.proj / fc1 / fc2 with the head trained
  (14.1 vs 46.6 MiB at batch 32; tests/test_spt_vqt.py measures it);
* on attach, a forward hook on the model's head (`head`) replaces the head's output with the new
  head's logits on the hook's input (the final class token) and the summaries of this forward.
  Disabling the adapter turns both off: blocks and head are the base model's again.

The bound of the query init needs the patch size and the new head needs the old head's shape; both
sit outside the block container, so the initialisation finishes in `HeadReplacement.attach`.

Structure (found by module names, as in timm): blocks with `norm1`, `attn.qkv` (a linear of width 3d,
q | k | v, heads of d / heads), `attn.proj`, `norm2`, `mlp`, and x + attn(norm1(x)), x + mlp(norm2(x));
timm's optional layer scales `ls1` / `ls2` are applied when present.

Choices (methods.md 10.2 has no UNVERIFIED items; these follow the reference code, andytu28/VQT):
* features L2-normalised per group (the reference's NORMALIZE_FEATS, default on); the backbone's
  summaries are the raw block outputs of the query rows (no final norm), the class token the head's input;
* T = 5 by default (the reference's config default; its scripts sweep 1-10); dropout 0.1 on the queries;
* the new head: truncated-normal weights (std 0.02) and zero bias, as peftkit's ViT heads (the reference
  uses VPT's MLP head); the backbone's modes are the caller's (the reference forces eval: peftkit's ViT
  has no dropout, so train and eval agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.inject import get_module, plain_modules
from ..core.layer import AdapterLayer
from ..core.model_adapter import ModelAdapter
from ..core.registry import register, register_model_adapter
from .lora import adapter_dtype

BLOCK_PARTS = ("norm1", "attn", "attn.qkv", "attn.proj", "norm2", "mlp")


@dataclass
class VQTConfig(AdapterConfig):
    """Learnable query tokens per ViT block summarise its tokens; a new head reads the summaries."""

    method = "vqt"
    paper: ClassVar[str] = "Tu et al. 2023, arXiv:2212.03220"
    trainable: ClassVar[str] = "L T d (queries) + (d + L T d) C + C (new head)"
    trains_head = True

    targets: str | list[str] | None = "blocks"
    """The container (nn.Sequential / nn.ModuleList) of the ViT's transformer blocks."""

    num_queries: int = 5
    """T: query tokens per block."""

    dropout: float = 0.1
    """Dropout on the query tokens."""

    head: str = "head"
    """Module name of the model's classifier; VQT replaces its output and reads its input (the final
    class token)."""

    normalize_features: bool = True
    """L2-normalise the class token and each block's flattened summaries before the new head."""

    patch_size: int | None = None
    """p in the init bound √(6 / (3 p² + d)); None reads the kernel of the model's `patch_embed.proj`."""

    def validate(self) -> None:
        if not isinstance(self.num_queries, int) or self.num_queries < 1:
            raise ConfigError(f"num_queries must be a positive integer, got {self.num_queries!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.patch_size is not None and (not isinstance(self.patch_size, int) or self.patch_size < 1):
            raise ConfigError(f"patch_size must be a positive integer or None, got {self.patch_size!r}")
        if self.layers is not None:
            raise ConfigError("VQT puts queries in every block of the container; `layers` is not supported")
        if self.head in self.modules_to_save:
            raise ConfigError(f"VQT replaces the output of {self.head!r} with its own head, so training {self.head!r} "
                              "has no effect; remove it from modules_to_save (peftkit train: modules_to_save: [])")


def _block_heads(block: nn.Module, where: str) -> int:
    """Attention heads of a block after checking it has the structure VQT reads."""
    missing = [p for p in BLOCK_PARTS if not _has_submodule(block, p)]
    if missing:
        raise ConfigError(f"VQT needs pre-norm ViT blocks with {', '.join(BLOCK_PARTS)} (timm's names); {where} "
                          f"({type(block).__name__}) lacks {missing}; point targets at the ViT's block container")
    qkv, attn = block.attn.qkv, block.attn
    if not weights.is_linear(qkv) or weights.in_out_features(qkv)[1] != 3 * weights.in_out_features(qkv)[0]:
        raise ConfigError(f"VQT needs {where}.attn.qkv to be one linear layer of width 3 d (q | k | v)")
    heads = getattr(attn, "heads", None) or getattr(attn, "num_heads", None)
    if not isinstance(heads, int) or weights.in_out_features(qkv)[0] % heads:
        raise ConfigError(f"{where}.attn has no integer `heads` / `num_heads` dividing the width; VQT cannot split heads")
    return heads


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class VQTBlocks(AdapterLayer):
    """The block container with query tokens per block; owns the new head (see the module docstring)."""

    mergeable = False
    routes_itself = True  # the blocks' output is the frozen one; the head hook weighs the logits per sample

    def __init__(self, blocks: nn.Module, cfg: VQTConfig, name: str) -> None:
        super().__init__(blocks)
        if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
            raise ConfigError(f"VQT targets the ViT's block container (nn.Sequential / nn.ModuleList); {name} is a "
                              f"{type(blocks).__name__}")
        self.heads = [_block_heads(block, f"{name}.{i}") for i, block in enumerate(blocks)]
        w = weights.get_weight(blocks[0].attn.qkv)
        widths = {weights.in_out_features(b.attn.qkv)[0] for b in blocks}
        if len(widths) != 1:
            raise ConfigError(f"VQT needs one token width across {name}; found {sorted(widths)}")
        self.dim = widths.pop()
        self.queries = nn.Parameter(torch.zeros(len(blocks), cfg.num_queries, self.dim, dtype=adapter_dtype(w),
                                                device=w.device))  # (L, T, d)
        self.query_dropout = nn.Dropout(cfg.dropout)
        self.head_name, self.normalize, self.patch_size = cfg.head, cfg.normalize_features, cfg.patch_size
        self.classifier: nn.Linear | None = None  # made by `HeadReplacement`: its shape needs the model's head
        self.summaries: list[torch.Tensor] | None = None
        """The last forward's per-block summaries, L x (b, T, d); the head hook takes (and clears) them."""
        self._init_pending = False

    # --- initialisation (finishes in `HeadReplacement.attach`) ----------------------------------------------
    def reset_parameters(self) -> None:
        if self.classifier is None:
            self._init_pending = True  # the bound needs the patch size: attach finishes it
            return
        with torch.no_grad():
            bound = math.sqrt(6.0 / (3 * self.patch_size**2 + self.dim))
            self.queries.uniform_(-bound, bound)
            nn.init.trunc_normal_(self.classifier.weight, std=0.02)
            nn.init.zeros_(self.classifier.bias)

    # --- forward ----------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The frozen blocks' output, exactly; keeps each block's query summary for the head hook."""
        if args or kwargs:
            raise TypeError("VQT's block container takes the tokens only")
        queries = self.query_dropout(self.queries)  # (L, T, d)
        summaries = []
        for block, heads, q in zip(self.base, self.heads, queries.unbind(0), strict=True):
            x, summary = _block_and_summary(block, heads, q, x)
            summaries.append(summary)
        self.summaries = summaries
        return x

    def _replace_logits(self, head: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled or not (self.is_active or self.routing()):
            return None
        summaries, self.summaries = self.summaries, None
        if summaries is None:
            raise RuntimeError(f"VQT: {self.head_name} ran without the block container in this forward")
        cls = args[0]
        if cls.dim() != 2:
            raise RuntimeError(f"VQT reads {self.head_name}'s input as (batch, features); got {tuple(cls.shape)}")
        groups = [cls, *(s.flatten(1) for s in summaries)]  # (b, d_c), L x (b, T d)
        if self.normalize:
            groups = [F.normalize(g.to(torch.promote_types(g.dtype, torch.float32)), dim=-1) for g in groups]
        logits = self.classifier(torch.cat([g.to(self.classifier.weight.dtype) for g in groups], dim=-1)).to(output.dtype)
        share = self.sample_weights(logits.shape[0], logits.device)  # a mixed-adapter call: its samples only
        return logits if share is None else output + share.to(output.dtype).view(-1, 1) * (logits - output)

    def extra_repr(self) -> str:
        layers, tokens, dim = self.queries.shape
        return f"layers={layers}, queries={tokens}, dim={dim}, head={self.head_name}"


def _block_and_summary(block: nn.Module, heads: int, queries: torch.Tensor,
                       x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block output without autograd history, the queries' summary with it); the block's qkv output is
    freed on return (a function scope, so no loop variable keeps it alive into the next block)."""
    with torch.no_grad():
        qkv, out = _run_keeping_qkv(block, x)  # (b, N, 3d), (b, N, d)
    return out, query_path(block, heads, queries, qkv)


def _run_keeping_qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qkv output, block output) of one block run as the model runs it."""
    kept: list[torch.Tensor] = []
    handle = block.attn.qkv.register_forward_hook(lambda module, args, out: kept.append(out))
    try:
        out = block(x)
    finally:
        handle.remove()
    if len(kept) != 1:
        raise RuntimeError(f"VQT expected one call of attn.qkv per block, saw {len(kept)}")
    return kept[0], out


def query_path(block: nn.Module, heads: int, queries: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
    """The query rows of [Q; X] through `block`, keys and values from X only: the summary (b, T, d).

    `queries` (T, d); `qkv` (b, N, 3d) is the block's own qkv output on X (detached: the queries'
    gradient needs K and V, not their history).
    """
    b, n, width = qkv.shape
    d, tokens = width // 3, queries.shape[0]
    attn = block.attn
    z = queries.to(qkv.dtype).expand(b, -1, -1)  # (b, T, d)
    w, bias = weights.get_weight(attn.qkv)[:d], weights.get_bias(attn.qkv)
    q = F.linear(block.norm1(z), w, None if bias is None else bias[:d])  # (b, T, d): query rows only
    # a copy of K and V only: attention saves them for backward, and views would keep all of qkv alive
    kv = qkv.detach()[..., d:].reshape(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4).contiguous()
    k, v = kv.unbind(0)  # (b, heads, N, d_h)
    q = q.reshape(b, tokens, heads, d // heads).transpose(1, 2)  # (b, heads, T, d_h)
    mixed = F.scaled_dot_product_attention(q, k, v, scale=getattr(attn, "scale", None))  # (b, heads, T, d_h)
    z = z + _layer_scale(block, "ls1", attn.proj(mixed.transpose(1, 2).reshape(b, tokens, d)))
    return z + _layer_scale(block, "ls2", block.mlp(block.norm2(z)))


def _layer_scale(block: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    scale = getattr(block, name, None)
    return x if scale is None else scale(x)


def _find_head(root: nn.Module, name: str) -> nn.Module:
    try:
        head = get_module(root, name)
    except AttributeError as err:
        raise ConfigError(f"VQT replaces the output of the model's head; {type(root).__name__} has no module "
                          f"{name!r}; set VQTConfig.head") from err
    if not weights.is_linear(head):
        raise ConfigError(f"VQT needs {name!r} to be the linear classifier; it is a {type(head).__name__}")
    return head


def _patch_size(root: nn.Module) -> int:
    for name, module in plain_modules(root):
        if (name == "patch_embed.proj" or name.endswith(".patch_embed.proj")) and isinstance(module, nn.Conv2d):
            return int(module.kernel_size[0])
    raise ConfigError("VQT found no patch_embed.proj Conv2d to read the patch size from; set VQTConfig.patch_size")


@register_model_adapter(VQTConfig)
class HeadReplacement(ModelAdapter):
    """Finds the model's head, makes the classifier over [CLS; summaries] (its shape needs the head) and hooks
    the head so that its logits are replaced; one VQT adapter per model."""

    def attach(self, model: nn.Module, layers: dict) -> None:
        super().attach(model, layers)
        blocks = self.only_layer()
        stacked = [m.adapter_name for m in model.modules() if isinstance(m, VQTBlocks) and m is not blocks
                   and m.adapter_name != blocks.adapter_name]
        if stacked:
            raise ConfigError(f"VQT replaces the head's logits, and adapter {stacked[0]!r} is a VQT already: two VQT "
                              "adapters cannot share a model; delete it first (peftkit.delete)")
        others = [n for n, m in plain_modules(model) if isinstance(m, VQTBlocks) and m is not blocks]
        if others:
            raise ConfigError(f"VQT targets matched several block containers ({others} and this one); name one")
        head = _find_head(model, blocks.head_name)
        blocks.patch_size = blocks.patch_size or _patch_size(model)
        d_head, classes = weights.in_out_features(head)
        q = blocks.queries
        features = d_head + q.shape[0] * q.shape[1] * blocks.dim
        blocks.classifier = nn.Linear(features, classes, device=q.device, dtype=q.dtype).train(blocks.training)
        self.hook(head.register_forward_hook(blocks._replace_logits))
        if blocks._init_pending:
            blocks._init_pending = False
            blocks.reset_parameters()

    def detach(self, model: nn.Module) -> None:
        super().detach(model)
        for blocks in self.layers.values():
            blocks.summaries = None


@register(VQTConfig)
def build(module: nn.Module, cfg: VQTConfig, name: str) -> VQTBlocks:
    """Wrap the block container (every matched container raises unless it holds ViT blocks)."""
    return VQTBlocks(module, cfg, name)
