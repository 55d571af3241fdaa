"""DSEE: dually sparsity-embedded efficient tuning (Chen, Chen, Cheng, Chen, Wang, Awadallah, 2021, arXiv:2111.00160).

Stage 1, a sparse plus low-rank update of each adapted matrix:

    y = W0 x + b0 + s (B A x + S x),     Delta W = s (B A + S ⊙ M),     s = alpha / r,

with A (r, d_in) ~ N(0, 0.02^2), B (d_out, r) = 0, and S a sparse matrix whose support M (N = num_sparse
entries per matrix) is fixed at apply time from W0 and whose values start at 0, so the model is unchanged
at init. Trainable parameters per layer: r (d_in + d_out) + N.

The support is chosen by one of (`SUPPORTS`, keyed by `DSEEConfig.support`):

* "grebsmo" (the paper's): an alternating low-rank + sparse decomposition W0 ~ U V + S (QR updates of U
  and V, S = W0 - U V with entries below `threshold` zeroed, the rank of U V growing by 5 per outer
  step), then M = the N largest |S|;
* "magnitude": the N largest |W0| (the code's "omp"); "random": N uniformly drawn entries ("rp");
* "svd": the N largest entries of the residual W0 - (rank-k SVD of W0).

S is stored as what it is: N flat indices into the (d_out, d_in) weight (an int64 buffer, saved with the
adapter) and N values (a Parameter). No dense d_out x d_in S or mask exists during training, so memory
is proportional to N and the gradient outside M is zero by construction. The forward gathers the N input
features S needs and adds them into the base output in place (`SparseAdd`, index_select + index_add_):
measured ~4x faster than a torch.sparse COO matmul at 1024 tokens, d = 384/1024, N = 64 (CPU, forward +
backward, noisy shared machine: 1.0 vs 4.3 ms at 384x384, 2.1 vs 10.0 ms at 1024x384). Its pieces cost
~0.5 ms a layer, so a DSEE step (r 16, N 64, all 7 linear layers of the benchmark Llama) measured ~1.14x
the floor against LoRA r16's ~1.11x, at LoRA r16's peak memory (one thread, noisy).

Stage 2, sparse final weights: `sparsify_weights` magnitude-prunes merged weights (a state dict) to a
given density and returns the masks; `mask_gradients` keeps those masks during a re-tune (recipe in
`sparsify_weights`). Structured (attention-head) pruning is not implemented.

UNVERIFIED choices (methods.md 2.10 and the reference run_glue.py):
* GreBsmo's final rank is not stated in the paper. The reference runs 100 outer steps, rank 496 on
  BERT-base's 768x768; on smaller layers that is (nearly) full rank and the residual vanishes (measured on
  a random-init 384x384 layer: 2,284 entries pass the threshold at rank 250, against 46k at rank 128).
  Here `decomposition_rank` defaults to the LoRA rank r (capped below min(d_out, d_in)): the support
  then holds the entries a rank-r view of W0 explains worst. Two inner updates per rank, threshold 0.01
  and a rank step of 5 as in the reference.
* M = the N largest |W0 - U V|: the same entries as the N largest |S| whenever S has at least N non-zeros
  (S keeps exactly the residual entries above the threshold); when it has fewer, the next-largest
  residuals fill M instead of an arbitrary pick among zeros, so nnz(M) = N always.
* The new rows the reference takes from R of QR(E) (E the residual) are taken here as Q5^T E with Q5 an
  orthonormal basis of E's first 5 columns: the same rows up to sign, without a full QR of E.
* "svd" is not implemented in the reference (it raises); it uses the same `decomposition_rank`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.registry import register
from .lora import LoRALinear
from .lowrank import apply_in_place

GREBSMO_RANK_STEP = 5
"""Rank added to U V per outer step (reference: the first 5 rows of R in QR of the residual)."""

GREBSMO_INNER_STEPS = 2
"""Alternating U, V, S updates per rank (reference: 2)."""



@dataclass
class DSEEConfig(AdapterConfig):
    """Sparse + low-rank update with a support picked from the pretrained weight."""

    method = "dsee"
    paper: ClassVar[str] = "Chen et al. 2021, arXiv:2111.00160"
    trainable: ClassVar[str] = "r (d_in + d_out) + num_sparse per layer"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); the paper adapts the query and value projections."""

    r: int = 16
    """Rank of the low-rank part B A (the paper's default 16)."""

    alpha: float = 32.0
    """Scale numerator: both B A and S are multiplied by alpha / r."""

    num_sparse: int = 64
    """N: trainable sparse entries per adapted matrix (the paper uses 16 or 64)."""

    support: str = "grebsmo"
    """How the N entries are chosen from W0: "grebsmo", "magnitude", "random" or "svd"."""

    decomposition_rank: int | None = None
    """Rank of the low-rank part removed from W0 before picking the largest residual entries ("grebsmo",
    "svd"); None: the LoRA rank r, capped at min(d_out, d_in) - 1."""

    threshold: float = 0.01
    """GreBsmo's hard threshold: residual entries with |value| below it are not part of S."""

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"DSEE rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.num_sparse, int) or self.num_sparse < 0:
            raise ConfigError(f"num_sparse must be a non-negative integer, got {self.num_sparse!r}")
        if self.support not in SUPPORTS:
            raise ConfigError(f"unknown DSEE support {self.support!r}; choose one of {', '.join(SUPPORTS)}")
        rank = self.decomposition_rank
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"decomposition_rank must be a positive integer or None, got {rank!r}")
        if self.threshold < 0:
            raise ConfigError(f"threshold must be >= 0, got {self.threshold}")


class DSEELinear(LoRALinear):
    """DSEE on nn.Linear and GPT-2 Conv1D: LoRA's low-rank path plus N sparse entries of S."""

    def __init__(self, base: nn.Module, cfg: DSEEConfig) -> None:
        d_in, d_out = weights.in_out_features(base)
        _check_shape(cfg, d_in, d_out)
        super().__init__(base, cfg.r, cfg.alpha / cfg.r, 0.0, "kaiming")
        self.support, self.num_sparse = cfg.support, cfg.num_sparse
        self.decomposition_rank = cfg.decomposition_rank or max(1, min(cfg.r, min(d_in, d_out) - 1))
        self.threshold = cfg.threshold
        device = self.lora_A.device
        self.sparse_values = nn.Parameter(torch.zeros(cfg.num_sparse, dtype=self.lora_A.dtype, device=device))
        self.register_buffer("sparse_index", torch.zeros(cfg.num_sparse, dtype=torch.long, device=device))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)  # the DSEE code's init (not LoRA's kaiming)
            nn.init.zeros_(self.lora_B)
            nn.init.zeros_(self.sparse_values)
            w = weights.get_weight(self.base).float()
            self.sparse_index.copy_(SUPPORTS[self.support](w, self.num_sparse, self))

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = super().adapt(x, y)  # y + s B A x, in place where the dtypes allow
        if self.num_sparse == 0:
            return y
        d_in = self.lora_A.shape[1]
        rows, cols = self.sparse_index.div(d_in, rounding_mode="floor"), self.sparse_index.remainder(d_in)
        return apply_in_place(SparseAdd, y, x, self.sparse_values, rows, cols, self.scaling)

    def sparse_delta(self) -> torch.Tensor:
        """S ⊙ M as a dense (d_out, d_in) matrix (merging and tests only; training never forms it)."""
        d_out, d_in = self.lora_B.shape[0], self.lora_A.shape[1]
        dense = torch.zeros(d_out * d_in, dtype=self.sparse_values.dtype, device=self.sparse_values.device)
        return dense.index_add(0, self.sparse_index, self.sparse_values).view(d_out, d_in)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A + self.sparse_delta())

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, num_sparse={self.num_sparse}, support={self.support}"


def _check_shape(cfg: DSEEConfig, d_in: int, d_out: int) -> None:
    """Reject, at apply time, settings that do not fit a (d_out, d_in) layer."""
    if cfg.r > min(d_in, d_out):
        raise ConfigError(f"DSEE rank r={cfg.r} exceeds the layer's min(d_in, d_out) = {min(d_in, d_out)}; lower r")
    if cfg.num_sparse > d_in * d_out:
        raise ConfigError(f"num_sparse={cfg.num_sparse} exceeds the layer's {d_out}x{d_in} = {d_in * d_out} "
                          "entries; lower num_sparse")
    rank = cfg.decomposition_rank
    if cfg.support in ("grebsmo", "svd") and rank is not None and rank >= min(d_in, d_out):
        raise ConfigError(f"decomposition_rank={rank} must be below the layer's min(d_in, d_out) = "
                          f"{min(d_in, d_out)} (at full rank nothing is left to pick from); lower it or use None")


class SparseAdd(torch.autograd.Function):
    """y[..., rows] += s values * x[..., cols], accumulated into the base output y in place.

    The N-entry sparse matrix S acts as a gather of N input features, a scale, and a scatter-add into
    N output features: O(tokens N) work instead of a (d_out, d_in) matmul. Backward saves only x (which
    the base layer saves anyway) and the index vectors; dL/dy passes through untouched.
    """

    @staticmethod
    def forward(ctx, y, x, values, rows, cols, scaling: float):
        gathered = x.index_select(-1, cols) * values  # (..., N)
        y.index_add_(-1, rows, gathered.to(y.dtype), alpha=scaling)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, values, rows, cols)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad):
        x, values, rows, cols = ctx.saved_tensors
        grad_at = grad.index_select(-1, rows)  # (..., N)
        dx = dv = None
        if ctx.needs_input_grad[1]:
            src = (grad_at * (values * ctx.scaling)).to(x.dtype)
            dx = torch.zeros_like(x).index_add_(-1, cols, src)
        if ctx.needs_input_grad[2]:
            n = values.shape[0]
            x_at = x.index_select(-1, cols).reshape(-1, n).to(values.dtype)  # (tokens, N)
            dv = (grad_at.reshape(-1, n).to(values.dtype) * x_at).sum(0).mul_(ctx.scaling)
        return grad, dx, dv, None, None, None


def sparse_add_reference(y: torch.Tensor, x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                         cols: torch.Tensor, scaling: float) -> torch.Tensor:
    """y + s x S^T with S (d_out, d_in) zero but S[rows[n], cols[n]] = values[n], S formed densely by autograd.
    What `SparseAdd` adds into y in place (one dtype for all tensors)."""
    dense = values.new_zeros(y.shape[-1], x.shape[-1]).index_put((rows, cols), values, accumulate=True)
    return y + scaling * (x @ dense.T)


# --- support selection: a table of functions (W0 (d_out, d_in) float, N, layer) -> N sorted flat indices ---
def _largest(score: torch.Tensor, num: int) -> torch.Tensor:
    """Flat indices of the `num` largest entries of `score` (exactly num of them, ties broken by topk)."""
    return torch.topk(score.flatten(), num).indices.sort().values


def _support_magnitude(w: torch.Tensor, num: int, layer: DSEELinear) -> torch.Tensor:
    return _largest(w.abs(), num)


def _support_random(w: torch.Tensor, num: int, layer: DSEELinear) -> torch.Tensor:
    return torch.randperm(w.numel(), device=w.device)[:num].sort().values


def _support_svd(w: torch.Tensor, num: int, layer: DSEELinear) -> torch.Tensor:
    k = layer.decomposition_rank
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    return _largest((w - (u[:, :k] * sv[:k]) @ vh[:k]).abs(), num)


def _support_grebsmo(w: torch.Tensor, num: int, layer: DSEELinear) -> torch.Tensor:
    low_rank, _ = grebsmo(w, layer.decomposition_rank, layer.threshold)
    return _largest((w - low_rank).abs(), num)  # = the largest |S| (module docstring)


def grebsmo(w: torch.Tensor, rank: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U V, S) with W ~ U V + S, by alternating updates with a growing rank (GreBsmo, Zhou and Tao 2013,
    as the DSEE code runs it).

    Per rank: U = orth((W - S) V^T), V = U^T (W - S), S = hard_threshold(W - U V); then the rank grows by
    GREBSMO_RANK_STEP rows spanning the leading columns of the residual E = W - U V - S.
    """
    v = torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device)  # (k, d_in)
    while True:
        s = torch.zeros_like(w)
        for _ in range(GREBSMO_INNER_STEPS):
            u = torch.linalg.qr((w - s) @ v.T).Q  # (d_out, k)
            v = u.T @ (w - s)  # (k, d_in)
            residual = w - u @ v
            s = residual * (residual.abs() >= threshold)
        if v.shape[0] >= rank:
            return u @ v, s
        e = residual - s  # the part neither U V nor S explains
        basis = torch.linalg.qr(e[:, :GREBSMO_RANK_STEP]).Q  # (d_out, 5)
        v = torch.cat([v, basis.T @ e])[:rank]


SUPPORTS: dict[str, Callable[[torch.Tensor, int, DSEELinear], torch.Tensor]] = {
    "grebsmo": _support_grebsmo,
    "magnitude": _support_magnitude,
    "random": _support_random,
    "svd": _support_svd,
}


@register(DSEEConfig)
def build(module: nn.Module, cfg: DSEEConfig, name: str) -> DSEELinear | None:
    """DSEE wraps linear layers (nn.Linear, GPT-2 Conv1D); other matched modules are left alone."""
    return DSEELinear(module, cfg) if weights.is_linear(module) else None


# --- stage 2: sparse final weights -----------------------------------------------------------
def sparsify_weights(state: dict[str, torch.Tensor], density: float,
                     scope: str = "layer") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Magnitude-prune weights to `density`; returns (pruned weights, boolean keep-masks), inputs untouched.

    Args:
        state: {name: weight}, e.g. the merged weights of the adapted matrices.
        density: share of entries kept, in (0, 1]: round(density * numel) per tensor ("layer"), or of all
            tensors together ("global", one magnitude threshold across them).
        scope: "layer" or "global".

    DSEE's second stage, merged weights pruned then re-tuned with the masks kept::

        names = [f"{n}.weight" for n in peftkit.core.apply.get_state(model).adapted]   # before unloading
        plain = peftkit.unload(peftkit.merge(model))
        pruned, masks = sparsify_weights({k: plain.state_dict()[k] for k in names}, density=0.5)
        plain.load_state_dict(pruned, strict=False)
        handles = mask_gradients(plain, masks)     # the kept entries train, the pruned stay exactly 0
        ... train (SGD/Adam/AdamW: a zero gradient from the start never moves a zero weight) ...
        for h in handles: h.remove()
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "layer":
        masks = {k: _keep_mask(w.detach().abs().flatten(), density).view(w.shape) for k, w in state.items()}
    else:
        flat = torch.cat([w.detach().abs().float().flatten() for w in state.values()])
        keep = _keep_mask(flat, density).split([w.numel() for w in state.values()])
        masks = {k: m.view(w.shape) for (k, w), m in zip(state.items(), keep, strict=True)}
    pruned = {k: w.detach().masked_fill(~masks[k], 0) for k, w in state.items()}
    return pruned, masks


def _keep_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.topk(scores, round(density * scores.numel())).indices] = True
    return keep


def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Make the masked parameters trainable with their gradients multiplied by the mask; returns hook handles."""
    params = dict(model.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise KeyError(f"no parameter named {missing[:3]} in the model; mask keys must be parameter names")
    handles = []
    for name, mask in masks.items():
        params[name].requires_grad_(True)
        handles.append(params[name].register_hook(lambda g, m=mask: g * m.to(g.dtype)))
    return handles
