"""SPT: sensitivity-aware visual parameter-efficient fine-tuning (He, Cai, Zhang, Tao, Zhuang, 2023,
arXiv:2303.15051).

Step 1, sensitivity (`spt_sensitivity`): over a few task batches, s_n = Σ_batches (∂L/∂w_n)² for every
backbone parameter w_n (a first-order Taylor estimate of the loss change), skipping the head, the class
token, the patch embedding and the position embedding (`SPTConfig.skip`).

Step 2, allocation (`spt_allocate`): the global top-τ entries by s, then per candidate

* weight matrix (of a target linear layer) with c selected entries: c >= r (d_in + d_out) / α -> LoRA
  on the whole matrix (structured, W = W0 + s B A); 0 < c below that -> only the c entries train
  (unstructured, W = W0 + scatter(indices, values), values init 0);
* vector (bias, norm) of length n with c >= n / β selected entries -> the whole vector trains.

τ is the largest count whose plan fits `budget` trainable parameters (the reference sweeps τ and keeps
the configuration closest to each target budget; here the budget is a cap, found by bisection: the
plan's size never decreases as τ grows while α, β >= 1).

Trainable: Σ_LoRA matrices r (d_in + d_out) + Σ_sparse matrices c + Σ_tuned vectors n (+ modules_to_save,
e.g. the task head, which SPT trains fully).

The plan (which matrices get LoRA, which flat entry indices of which matrix, which vectors) is part of the
config, so `peftkit.save` / `peftkit.load` rebuild the adapter exactly without data. The two-step API::

    cfg = peftkit.calibrate(model, SPTConfig(budget=20_000, modules_to_save=["head"]), batches)  # = spt_plan
    peftkit.apply(model, cfg)

(`peftkit train` runs the calibration on the first training batches by itself.)

(`batches`: model keyword dicts whose output has `.loss`, e.g. with `labels`; or pass `loss_fn(model, batch)`.)
A config without a plan raises at `apply`. Mergeable: LoRA and the sparse deltas fold into W; tuned
vectors train in place (core's selection machinery keeps their originals).

The unstructured delta is stored as flat indices into the canonical (d_out, d_in) weight (from the plan,
not saved twice) and a values vector; the forward gathers the c input features and scatter-adds them into
the base output (DSEE's `SparseAdd`, which saves nothing weight-sized). That kernel costs O(tokens c); a
matrix only stays unstructured while c < r (d_in + d_out) / α, i.e. fewer entries than the tokens' own
input and output widths, so the gather never outgrows the layer's activations.

Choices (methods.md 5.2 has no UNVERIFIED items; these are details it leaves open):
* Timm's fused `qkv` is one matrix here (LoRA of r (d + 3d) or unstructured); the reference's ViT has
  separate q, k, v layers. Any target linear layer is a candidate matrix, not only q/k/v/proj/fc1/fc2.
* Vector entries below the n / β threshold do not train (the reference tunes them through a gradient mask
  on the vector); vectors are a tiny share of the budget, and storing them sparsely would mean wrapping
  every norm layer. Their selected entries count towards τ but not towards the trainable size.
* LoRA as in the reference: kaiming A, zero B, scaling lora_alpha / r = 1 by default; its DropPath(0.1) on
  the LoRA branch is not reproduced. Weight decay acts on the deltas, not on W0 + delta.
* Skip entries match whole dotted components ("head" skips "head.weight", not "blocks.0.attn.heads");
  the model's output head (core's head detection) is always skipped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.adapters import plain_parameters
from ..core.apply import has_adapter
from ..core.calibration import batch_loss
from ..core.config import AdapterConfig, ConfigError
from ..core.inject import find_targets, get_module, head_module_names, layer_index, matches
from ..core.layer import AdapterLayer
from ..core.registry import register, register_calibration, register_selection
from .dsee import SparseAdd
from .lora import LoRALinear, adapter_dtype
from .lowrank import apply_in_place

DEFAULT_SKIP = ["head", "cls_token", "patch_embed", "pos_embed"]
"""Parameters never scored (the reference's list): the head trains fully, the rest stays frozen."""

PLAN_KEYS = ("tau", "lora", "sparse", "vectors")


@dataclass
class SPTConfig(AdapterConfig):
    """Sensitivity-aware selection: LoRA on sensitive matrices, sparse deltas elsewhere, whole vectors."""

    method = "spt"
    paper: ClassVar[str] = "He et al. 2023, arXiv:2303.15051"
    trainable: ClassVar[str] = "r (d_in + d_out) per LoRA matrix + selected entries per sparse matrix + tuned vectors"

    targets: str | list[str] | None = "all-linear"
    """Candidate weight matrices (see AdapterConfig.targets); every linear layer but the head by default."""

    budget: int | None = None
    """Trainable backbone parameters the plan may use (LoRA factors + sparse entries + vectors); needed by
    `spt_plan`, not once a plan exists."""

    r: int = 8
    """LoRA rank of a structurally tuned matrix (the reference's low_rank_dim)."""

    lora_alpha: float = 8.0
    """LoRA scale numerator: the update is multiplied by lora_alpha / r (1 by default, as in the reference)."""

    matrix_ratio: float = 10.0
    """α: a matrix gets LoRA when its selected entries reach r (d_in + d_out) / α (the reference's configs: 10)."""

    vector_ratio: float = 5.0
    """β: a vector trains whole when its selected entries reach len / β (the reference: 5)."""

    sensitivity_batches: int = 8
    """Batches `spt_plan` reads to accumulate the sensitivity (the reference: 8)."""

    skip: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP))
    """Parameters left out of the sensitivity: a name component or dotted run of components
    ("patch_embed" skips "patch_embed.proj.weight"). The output head is always skipped."""

    plan: dict[str, Any] | None = None
    """What trains, made by `spt_plan` / `spt_allocate`: {"tau": τ, "lora": [module names],
    "sparse": {module name: sorted flat indices into the (d_out, d_in) weight}, "vectors": [parameter names]}."""

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"SPT LoRA rank r must be a positive integer, got {self.r!r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.matrix_ratio < 1 or self.vector_ratio < 1:
            raise ConfigError(f"matrix_ratio (α) and vector_ratio (β) must be >= 1, got {self.matrix_ratio}, "
                              f"{self.vector_ratio}: below 1 a matrix would need more entries than LoRA has")
        if not isinstance(self.sensitivity_batches, int) or self.sensitivity_batches < 1:
            raise ConfigError(f"sensitivity_batches must be a positive integer, got {self.sensitivity_batches!r}")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ConfigError(f"budget must be a positive integer (trainable parameters), got {self.budget!r}")
        if self.plan is None and self.budget is None:
            raise ConfigError("SPTConfig needs budget=<trainable parameters> (then spt_plan(model, batches, cfg)) "
                              "or a plan made by spt_plan")
        if self.plan is not None:
            _check_plan(self.plan, [self.targets] if isinstance(self.targets, str) else list(self.targets or []))


def _check_plan(plan: dict, targets: list[str]) -> None:
    """Reject a malformed plan (e.g. a hand-edited adapter JSON) with a message that says what is wrong."""
    if not isinstance(plan, dict) or set(plan) - set(PLAN_KEYS):
        raise ConfigError(f"an SPT plan is a dict with keys {PLAN_KEYS}; got {plan!r:.200}")
    lora, sparse, vectors = plan.get("lora", []), plan.get("sparse", {}), plan.get("vectors", [])
    if not isinstance(lora, list) or not isinstance(sparse, dict) or not isinstance(vectors, list):
        raise ConfigError("SPT plan: 'lora' and 'vectors' must be lists of names, 'sparse' a {module: indices} dict")
    for name, index in sparse.items():
        ok = isinstance(index, list) and all(isinstance(i, int) and i >= 0 for i in index)
        if not ok or not index or any(a >= b for a, b in itertools.pairwise(index)):
            raise ConfigError(f"SPT plan: sparse indices of {name} must be a non-empty, strictly increasing list "
                              "of non-negative integers; make the plan with spt_plan")
    if set(lora) & set(sparse) or not (lora or sparse):
        raise ConfigError("the SPT plan must tune at least one weight matrix, each by LoRA or sparsely, not both; "
                          "with only vectors selected, raise the budget (or train biases/norms with BitFit)")
    explicit = not any(t in ("all-linear", "all-norms", "input-embeddings") for t in targets)  # else: at apply
    outside = [n for n in [*lora, *sparse] if explicit and not any(matches(n, t) for t in targets)]
    if outside:
        raise ConfigError(f"the SPT plan names matrices {outside[:5]} that targets {targets} do not select; "
                          "plan with the same targets you apply with")


# --- step 1: sensitivity ---------------------------------------------------------------------
def _skipped(name: str, skip: list[str], heads: set[str]) -> bool:
    dotted = f".{name}."
    return any(f".{s}." in dotted for s in skip) or any(name.startswith(h + ".") for h in heads)


def spt_sensitivity(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None,
                    skip: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Σ over `batches` of (∂L/∂w)² for every parameter not skipped, by parameter name (float32).

    The gradients are taken with `torch.autograd.grad` (no `.grad` is touched) with every scored
    parameter temporarily requiring grad; the model's mode (train/eval) is the caller's.
    """
    if has_adapter(model):
        raise ConfigError("compute the SPT sensitivity on the base model, before peftkit.apply")
    heads = head_module_names(model)
    skip = DEFAULT_SKIP if skip is None else skip
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point() and not _skipped(n, skip, heads)}
    if not params:
        raise ConfigError(f"every parameter is skipped (skip={skip}); nothing to score")
    scores = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    used = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            loss = (loss_fn or batch_loss)(model, batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for score, grad in zip(scores.values(), grads, strict=True):
                if grad is not None:
                    score.add_(grad.detach().float().square())
            used += 1
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    if used == 0:
        raise ConfigError("spt_sensitivity got no batches")
    return scores


# --- step 2: allocation ----------------------------------------------------------------------
@dataclass
class _Candidate:
    name: str
    """Module name of a matrix, parameter name of a vector."""
    numel: int
    lora_size: int | None
    """r (d_in + d_out) for a matrix; None for a vector."""


def _candidates(model: nn.Module, sensitivity: dict[str, torch.Tensor],
                cfg: SPTConfig) -> tuple[list[_Candidate], torch.Tensor]:
    """The scored matrices of target linear layers (canonical layout) and the scored vectors, and their
    scores flattened into one vector in the same order."""
    cands, scores = [], []
    for name in find_targets(model, cfg):
        module = get_module(model, name)
        score = sensitivity.get(f"{name}.weight")
        if not weights.is_linear(module) or score is None:
            continue  # not a linear layer, or its weight was skipped
        if weights.layer_kind(module) == "conv1d":
            score = score.T  # GPT-2 Conv1D stores (d_in, d_out)
        d_in, d_out = weights.in_out_features(module)
        if cfg.r > min(d_in, d_out):
            raise ConfigError(f"SPT rank r={cfg.r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {name}; lower r")
        cands.append(_Candidate(name, score.numel(), cfg.r * (d_in + d_out)))
        scores.append(score.reshape(-1))
    for name, score in sensitivity.items():
        if score.dim() == 1 and (cfg.layers is None or layer_index(name) in cfg.layers):
            cands.append(_Candidate(name, score.numel(), None))
            scores.append(score)
    if not any(c.lora_size for c in cands):
        raise ConfigError(f"SPT found no scored weight matrix among targets {cfg.targets!r} (skip={cfg.skip})")
    return cands, torch.cat([s.float() for s in scores])


def _selected_counts(ranks: torch.Tensor, sizes: list[int], tau: int) -> list[int]:
    return [int(c) for c in torch.stack([seg.lt(tau).sum() for seg in ranks.split(sizes)]).tolist()]


def _plan_size(cands: list[_Candidate], counts: list[int], cfg: SPTConfig) -> int:
    """Trainable parameters of the plan that these per-candidate selected counts give."""
    total = 0
    for cand, count in zip(cands, counts, strict=True):
        if cand.lora_size is not None:
            total += cand.lora_size if count >= cand.lora_size / cfg.matrix_ratio else count
        elif count and count >= cand.numel / cfg.vector_ratio:
            total += cand.numel
    return total


def spt_allocate(model: nn.Module, sensitivity: dict[str, torch.Tensor], cfg: SPTConfig,
                 tau: int | None = None) -> dict[str, Any]:
    """The plan for the top-`tau` entries, or (tau=None) for the largest τ whose plan fits `cfg.budget`."""
    cands, flat = _candidates(model, sensitivity, cfg)
    order = torch.sort(flat, descending=True, stable=True).indices  # ties: the earlier entry first
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    sizes = [c.numel for c in cands]
    if tau is None:
        if cfg.budget is None:
            raise ConfigError("spt_allocate needs cfg.budget or an explicit tau")
        low, high = 0, flat.numel()  # invariant: size(low) <= budget; size only grows with τ (α, β >= 1)
        while low < high:
            mid = (low + high + 1) // 2
            if _plan_size(cands, _selected_counts(ranks, sizes, mid), cfg) <= cfg.budget:
                low = mid
            else:
                high = mid - 1
        tau = low
    plan: dict[str, Any] = {"tau": int(tau), "lora": [], "sparse": {}, "vectors": []}
    for cand, seg in zip(cands, ranks.split(sizes), strict=True):
        chosen = seg.lt(tau)
        count = int(chosen.sum())
        if cand.lora_size is not None and count >= cand.lora_size / cfg.matrix_ratio:
            plan["lora"].append(cand.name)
        elif cand.lora_size is not None and count:
            plan["sparse"][cand.name] = chosen.nonzero().flatten().tolist()  # sorted flat indices
        elif cand.lora_size is None and count and count >= cand.numel / cfg.vector_ratio:
            plan["vectors"].append(cand.name)
    return plan


def spt_plan(model: nn.Module, batches: Iterable, cfg: SPTConfig, loss_fn: Callable | None = None) -> SPTConfig:
    """Sensitivity over the first `cfg.sensitivity_batches` batches, then the plan for `cfg.budget`:
    a copy of `cfg` with `plan` set, ready for `peftkit.apply`."""
    if cfg.budget is None:
        raise ConfigError("spt_plan needs SPTConfig(budget=<trainable parameters>)")
    scores = spt_sensitivity(model, itertools.islice(batches, cfg.sensitivity_batches), loss_fn, cfg.skip)
    return cfg.replace(plan=spt_allocate(model, scores, cfg))


@register_calibration(SPTConfig)
def calibrate(model: nn.Module, cfg: SPTConfig, batches: Iterable) -> SPTConfig:
    """`peftkit.calibrate` / `peftkit train`: `spt_plan` on the task's batches; a planned config is kept."""
    return cfg if cfg.plan is not None else spt_plan(model, batches, cfg)


# --- layers and registration -----------------------------------------------------------------
class SparseDeltaLinear(AdapterLayer):
    """W = W0 + scatter(index, values): only the planned entries of one weight matrix train."""

    def __init__(self, base: nn.Module, index: list[int], name: str) -> None:
        super().__init__(base)
        w = weights.get_weight(base)
        d_out, d_in = w.shape
        if index[-1] >= w.numel():
            raise ConfigError(f"SPT plan index {index[-1]} is outside {name}'s {d_out}x{d_in} weight: the plan was "
                              "made for another model; run spt_plan on this one")
        flat = torch.tensor(index, dtype=torch.long, device=w.device)
        self.shape = (d_out, d_in)
        self.values = nn.Parameter(torch.zeros(flat.numel(), dtype=adapter_dtype(w), device=w.device))
        # the indices live in the config's plan: buffers, but not saved a second time in the adapter file
        self.register_buffer("index", flat, persistent=False)
        self.register_buffer("rows", flat.div(d_in, rounding_mode="floor"), persistent=False)
        self.register_buffer("cols", flat.remainder(d_in), persistent=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.values.zero_()

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return apply_in_place(SparseAdd, y, x, self.values, self.rows, self.cols, 1.0)

    def delta_weight(self) -> torch.Tensor:
        dense = torch.zeros(math.prod(self.shape), dtype=self.values.dtype, device=self.values.device)
        return dense.index_add(0, self.index, self.values).view(self.shape)

    def extra_repr(self) -> str:
        return f"entries={self.values.numel()} of {self.shape[0]}x{self.shape[1]}"


def _require_plan(cfg: SPTConfig) -> dict[str, Any]:
    if cfg.plan is None:
        raise ConfigError("this SPTConfig has no plan yet: make one from a few task batches first, "
                          "cfg = peftkit.calibrate(model, cfg, batches) (or spt_plan), then peftkit.apply(model, cfg)")
    return {"lora": [], "sparse": {}, "vectors": [], **cfg.plan}


@register(SPTConfig)
def build(module: nn.Module, cfg: SPTConfig, name: str) -> AdapterLayer | None:
    """LoRA or a sparse delta on the planned matrices; other target modules are left alone."""
    plan = _require_plan(cfg)
    planned = name in plan["lora"] or name in plan["sparse"]
    if planned and not weights.is_linear(module):
        raise ConfigError(f"the SPT plan names {name}, a {type(module).__name__}; SPT tunes linear layers only")
    if name in plan["lora"]:
        d_in, d_out = weights.in_out_features(module)
        if cfg.r > min(d_in, d_out):
            raise ConfigError(f"SPT rank r={cfg.r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {name}; lower r")
        return LoRALinear(module, cfg.r, cfg.lora_alpha / cfg.r, 0.0, "kaiming")
    if name in plan["sparse"]:
        return SparseDeltaLinear(module, plan["sparse"][name], name)
    return None


@register_selection(SPTConfig)
def select(model: nn.Module, cfg: SPTConfig) -> list[str]:
    """The planned vectors, under their names in the adapted model; checks every planned matrix was adapted."""
    plan = _require_plan(cfg)
    missing = [n for n in [*plan["lora"], *plan["sparse"]] if not _is_adapted(model, n)]
    if missing:
        raise ConfigError(f"the SPT plan names matrices that are not target linear layers of this model: "
                          f"{missing[:5]}; run spt_plan on this model with the same targets")
    params = plain_parameters(model)  # the model's own names, whichever adapters wrap the modules
    missing = [n for n in plan["vectors"] if n not in params]
    if missing:
        raise ConfigError(f"the SPT plan names parameter {missing[0]}, which this model lacks; run spt_plan on it")
    return list(plan["vectors"])


def _is_adapted(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(get_module(model, name), AdapterLayer)
    except AttributeError:
        return False
