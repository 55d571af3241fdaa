"""TriAdaptLoRA: triangular adaptive low-rank adaptation (Liang, Wang & Zeng, 2025, arXiv:2501.08008).

    y = W0 x + b0 + alpha / (ranknum + 1e-5) * B C A dropout(x),   C = L + U   (r x r, r = ranknum)

A in R^{r x d_in}, B in R^{d_out x r}. The core C is split into a block-lower-triangular part L and a
block-upper-triangular part U: growing the rank by k appends a row block (k x r_new) to L and a
column block (r_new x k) to U, so C grows as a bordered matrix and earlier blocks are kept. Every
`incre_interval` steps after `init_warmup`, each module's importance is the growth of its normalized
Frobenius norm ||C||_F / n_blocks since the last growth event, and the modules above a dynamic
threshold grow by `rank_step`: the threshold is the score of the n-th best module, n = f(missing
rank, training progress u) with f linear (the paper's best: missing * u), exponential
(missing ** u) or cosine (missing * (1 - cos(pi u)) / 2); see `schedules/rank_budget.py`. Growth
stops at `target_rank x n_modules`. The loss gains gamma R with R AdaLoRA's orthogonality of A and B.

What could be verified (UNVERIFIED in methods.md): only the paper's abstract was readable here (the
stored arXiv page ends after it). The construction above (C = L + U from row/column blocks, score
= change of ||C||_F / n_blocks, n = int(missing * u) or int(missing ** u), scale alpha / ranknum,
orthogonality of A and B with weight 0.5) follows a `TriAdaptLoraConfig` implementation in a public
peft fork found by code search; the cosine schedule is not in it and uses the common half-cosine.
Our choices: that code initialises everything but the first A at zero, with which nothing can train
(dL/dB is proportional to C and dL/dC to B); we use the family's init instead, A, B ~ N(0, 0.02^2),
C = 0 (identity at init), and new blocks get the same (C's new border is 0, so growing adds nothing
to B C A; the output still changes through the scale alpha / ranknum, as in that code). The last
growth event is clipped at the target. No importance EMA (the score is
already a change over an interval).

Growth without new Parameters as in IncreLoRA (see increlora.py): preallocated chunks, unused ones
get no gradient. Trainable (allocated) per layer: sum over chunks of k (d_in + d_out + 2 r_end),
r_end the rank at the end of the chunk. No Hugging Face peft equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import weights
from ..core.config import AdapterConfig, ConfigError
from ..core.registry import register
from .increlora import chunk_sizes
from .svd_lora import RankGrowth, SVDLayer, init_factors

THRESHOLDS = ("linear", "exponential", "cosine")


@dataclass
class TriAdaptLoRAConfig(RankGrowth, AdapterConfig):
    """TriAdaptLoRA: B (L + U) A updates whose rank grows in the modules whose core grows fastest."""

    method = "triadaptlora"
    paper: ClassVar[str] = "Liang, Wang & Zeng 2025, arXiv:2501.08008"
    trainable: ClassVar[str] = "sum over chunks k (d_in + d_out + 2 r_end) per layer (allocated, max_r in all)"

    targets: str | list[str] | None = "all-linear"
    """Modules to adapt (see AdapterConfig.targets); every linear layer but the head by default."""

    init_r: int = 1
    """Rank of every module at the start."""

    target_rank: int = 8
    """Average rank at the end: growth stops at target_rank x n_modules."""

    rank_step: int | None = None
    """Rank a chosen module gains per growth event; None: target_rank // 2 (as the code's table)."""

    max_r: int | None = None
    """Rank a module can reach (preallocated); None: 4 x target_rank, at most min(d_in, d_out)."""

    threshold: str = "linear"
    """How the number of growing modules rises with training progress: "linear", "exponential", "cosine"."""

    init_warmup: int = 100
    """Steps before the first growth event."""

    incre_interval: int = 100
    """Steps between growth events."""

    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / current rank."""

    dropout: float = 0.0
    """Dropout probability on the input of the low-rank path."""

    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regularizer on A and B (0 switches it off)."""

    total_steps: int | None = None
    """Steps the threshold schedule spans; None: the training run's length."""

    def validate(self) -> None:
        ints = (self.init_r, self.target_rank, self.init_warmup, self.incre_interval, self.rank_step_value())
        if any(not isinstance(v, int) for v in ints) or min(ints) < 0 or self.init_r < 1 or self.incre_interval < 1:
            raise ConfigError(f"TriAdaptLoRA needs integers init_r >= 1, incre_interval >= 1, rank_step >= 1 and "
                              f"init_warmup >= 0; got {ints}")
        if self.target_rank < self.init_r or self.rank_step_value() < 1:
            raise ConfigError(f"need target_rank >= init_r and rank_step >= 1; got {self.target_rank}, "
                              f"{self.init_r}, {self.rank_step}")
        if self.max_r is not None and self.max_r < self.target_rank:
            raise ConfigError(f"max_r={self.max_r} is below target_rank={self.target_rank}")
        if self.threshold not in THRESHOLDS:
            raise ConfigError(f"unknown threshold schedule {self.threshold!r}; choose one of {', '.join(THRESHOLDS)}")
        if self.alpha <= 0 or not 0.0 <= self.dropout < 1.0 or self.orth_reg_weight < 0:
            raise ConfigError(f"need alpha > 0, 0 <= dropout < 1, orth_reg_weight >= 0; got {self.alpha}, "
                              f"{self.dropout}, {self.orth_reg_weight}")


class TriAdaptLinear(SVDLayer):
    """B (L + U) A on nn.Linear and GPT-2 Conv1D, its rank growing chunk by chunk."""

    def __init__(self, base: nn.Module, init_r: int, rank_step: int, capacity: int, alpha: float,
                 dropout: float) -> None:
        super().__init__(base, alpha, dropout, ranknum=init_r)
        sizes = chunk_sizes(init_r, rank_step, capacity)
        ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        kw = self.factory
        self.lora_A = nn.ParameterList([nn.Parameter(torch.zeros(k, self.d_in, **kw)) for k in sizes])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(self.d_out, k, **kw)) for k in sizes])
        # block i of L: rows of chunk i, columns up to its end; block i of U: the transpose shape
        self.lora_C_row = nn.ParameterList([nn.Parameter(torch.zeros(k, e, **kw)) for k, e in zip(sizes, ends, strict=True)])
        self.lora_C_col = nn.ParameterList([nn.Parameter(torch.zeros(e, k, **kw)) for k, e in zip(sizes, ends, strict=True)])
        self.init_r, self.rank_step, self.capacity = init_r, rank_step, capacity
        self.active = init_r  # Python mirror of the ranknum buffer (no device sync in forward)

    def reset_parameters(self) -> None:
        for a, b, c_row, c_col in zip(self.lora_A, self.lora_B, self.lora_C_row, self.lora_C_col, strict=True):
            init_factors(a, b, c_row)  # A, B ~ N(0, 0.02^2); C = 0: the model is unchanged
            c_col.data.zero_()
        self.ranknum.fill_(self.init_r)
        self.after_load()

    def after_load(self) -> None:
        self.active = int(round(self.ranknum.item()))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r, offset = self.active, 0
        qs, ps, rows, cols = [], [], [], []
        for a, b, c_row, c_col in zip(self.lora_A, self.lora_B, self.lora_C_row, self.lora_C_col, strict=True):
            if offset >= r:
                break  # unused chunks stay out of the graph: no gradient, untouched by the optimizer
            take = min(a.shape[0], r - offset)
            end = offset + take
            qs.append(a[:take])
            ps.append(b[:, :take])
            rows.append(F.pad(c_row[:take, :end], (0, r - end)))  # (take, r): block-lower-triangular rows
            cols.append(F.pad(c_col[:end, :take], (0, 0, 0, r - end)))  # (r, take): block-upper-triangular columns
            offset += a.shape[0]
        core = torch.cat(rows) + torch.cat(cols, dim=1)  # C = L + U, (r, r)
        return torch.cat(qs), core, torch.cat(ps, dim=1)

    def core_norm(self) -> torch.Tensor:
        """||C||_F / number of (partly) used chunks: the normalized Frobenius norm the importance tracks."""
        blocks = sum(1 for _ in self._used_chunks())
        return torch.linalg.matrix_norm(self.factors()[1].detach().float()) / blocks

    def _used_chunks(self):
        offset = 0
        for a in self.lora_A:
            if offset >= self.active:
                return
            yield a
            offset += a.shape[0]

    @torch.no_grad()
    def grow(self, count: int) -> None:
        """Add `count` ranks: the next rows of A, columns of B and the border of C join the forward."""
        self.active = min(self.active + count, self.capacity)
        self.ranknum.fill_(self.active)


@register(TriAdaptLoRAConfig)
def build(module: nn.Module, cfg: TriAdaptLoRAConfig, name: str) -> TriAdaptLinear | None:
    """Wrap a linear layer (None for other kinds); refuses ranks larger than the layer."""
    if not weights.is_linear(module):
        return None
    d_in, d_out = weights.in_out_features(module)
    capacity = cfg.max_r_for(d_in, d_out)
    if max(capacity, cfg.target_rank) > min(d_in, d_out):
        raise ConfigError(f"TriAdaptLoRA max_r/target_rank ({capacity}/{cfg.target_rank}) exceed min(d_in, d_out) = "
                          f"{min(d_in, d_out)} of {name}; lower them or exclude that module")
    return TriAdaptLinear(module, cfg.init_r, cfg.rank_step_value(), capacity, cfg.alpha, cfg.dropout)
