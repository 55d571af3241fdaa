"""`TrainConfig`: the settings of one training run, each documented for `peftkit train --help`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..core.config import ConfigError, check_fields


@dataclass
class TrainConfig:
    """Settings of one training run; every field is documented for `peftkit train --help`."""

    output_dir: str = "out"
    """Directory for checkpoints, metrics.json, loss.png and the final adapter."""

    lr: float = 1e-3
    """Peak learning rate, reached after warm-up and then decayed linearly to 0."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay on the trainable parameters."""

    decay_to_init: bool = False
    """Decay toward the values training started from instead of toward 0 (AdamR, DAREx-L2: keeps the
    update small and centred, so it survives DARE's pruning at high drop rates); needs weight_decay > 0."""

    max_steps: int | None = None
    """Optimizer steps to run; when set it wins over `epochs`."""

    epochs: float = 1.0
    """Passes over the training data (fractions allowed), used when `max_steps` is not set."""

    batch_size: int = 8
    """Examples per micro-batch on each rank."""

    grad_accum: int = 1
    """Micro-batches whose gradients are accumulated into one optimizer step."""

    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up."""

    warmup_ratio: float = 0.0
    """Warm-up as a share of all steps, instead of `warmup_steps`."""

    max_grad_norm: float = 1.0
    """Clip the global L2 norm of the trainable gradients to this; 0 turns clipping off (a NaN or
    infinite gradient stops the run either way). optimizer=mezo forms no gradient: leave it at 1 or 0."""

    eval_every: int = 0
    """Evaluate every N steps (and always after the last step); 0 evaluates only at the end."""

    eval_batches: int | None = None
    """Cap on the number of evaluation batches (all ranks together); None evaluates everything."""

    eval_batch_size: int | None = None
    """Examples per evaluation batch; None uses `batch_size`."""

    save_every: int = 0
    """Write a resumable checkpoint every N steps (and after the last step); 0 writes none."""

    keep_checkpoints: int = 2
    """How many of the newest checkpoints stay on disk."""

    seed: int = 0
    """Seed of the torch RNG (dropout) and of the data order; the same on every rank."""

    bf16: str | bool = "auto"
    """bf16 autocast: "auto" (on where the GPU supports bf16, never on CPU), true or false."""

    log_every: int = 50
    """Print a log line every N steps, 0 never; metrics.json records every step's loss anyway."""

    progress: bool = True
    """Show a progress bar (loss, samples/s, ETA) on rank 0."""

    num_workers: int = 0
    """DataLoader worker processes."""

    save_adapter: bool = True
    """Save the final adapter with `peftkit.save` to `output_dir/adapter`."""

    device: str = "auto"
    """Torch device; "auto" picks cuda:LOCAL_RANK when a GPU is present, else cpu."""

    overwrite: bool = False
    """Let a fresh run (not a resumed one) clear the checkpoints, metrics and adapter another run left in
    `output_dir`; without it such a run is refused, so two runs' files never mix."""

    optimizer: str = "adamw"
    """"adamw" (AdamW, or AdamR with decay_to_init), "galore" (AdamW whose moments live in a rank
    galore_rank projection of each 2-D trainable weight's gradient: GaLore, arXiv:2403.03507) or "mezo"
    (zeroth-order SGD from two forward passes, no backward: MeZO, arXiv:2305.17333; run in eval mode,
    dropout off; max_grad_norm does not apply; with grad_accum > 1 each loss is the mean over the
    step's grad_accum micro-batches). MeZO needs a far smaller lr (1e-6 full, 5e-5 LoRA)."""

    galore_rank: int = 128
    """GaLore: r, the rank of each weight's gradient projection (its moments hold r·max(m, n) numbers)."""

    galore_update_gap: int = 200
    """GaLore: T, steps between two refreshes of a projection (an SVD of the gradient)."""

    galore_scale: float = 0.25
    """GaLore: α, the factor on the projected-back update."""

    galore_natural: bool = False
    """GaLore: Natural GaLore (arXiv:2410.16029), the projected gradient preconditioned by the inverse
    empirical Fisher of its last 20 values."""

    mezo_eps: float = 1e-3
    """MeZO: ε, the scale of the random perturbation θ ± εz."""

    mezo_sparsity: float = 0.0
    """MeZO: share of each tensor's largest-magnitude entries left untouched (Sparse MeZO,
    arXiv:2402.15751); 0 is MeZO."""

    schedule: str | None = None
    """What trains when: None (everything trainable, every step), "lisa" (full fine-tuning of
    lisa_gamma random transformer blocks plus embeddings and head; method full only: LISA,
    arXiv:2403.17919), "ist" (the per-layer adapters of ist_num_update blocks per step, drawn by a
    learned importance score: IST, arXiv:2410.11772) or "mgpo" (LoRA's forward/backward at a
    momentum-guided perturbation of the frozen weight: LoRA-MGPO, arXiv:2502.14538)."""

    lisa_gamma: int = 2
    """LISA: γ, transformer blocks that train at a time."""

    lisa_period: int = 20
    """LISA: K, steps between two draws of the active blocks."""

    ist_num_update: int | None = None
    """IST: blocks whose adapters train per step; None uses a quarter of the blocks (at least 1)."""

    ist_update_interval: int = 10
    """IST: steps between two updates of the block scores, each from 3 eval-mode losses on the first
    evaluation batch; 0 never updates them (uniform sampling, no evaluation data needed)."""

    mgpo_rho: float = 0.05
    """LoRA-MGPO: ρ, the perturbation radius (0 is plain LoRA; the paper: 0.05 NLU, 0.01 NLG)."""

    mgpo_beta: float = 0.9
    """LoRA-MGPO: β, the decay of each layer's gradient-norm EMA (the paper: 0.9 NLU, 0.8 NLG)."""

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if isinstance(self.bf16, str) and self.bf16.lower() in ("true", "false"):
            self.bf16 = self.bf16.lower() == "true"
        # the range checks below compare numbers: run them on numbers only. Why check types at all: `lr=inf`
        # passed `lr > 0` and trained to NaN weights, `max_steps=1.5` failed deep inside `range()`, and
        # `progress="no"` was truthy
        errors = check_fields(self, "TrainConfig", lenient=True)
        if errors:
            raise ConfigError("invalid TrainConfig: " + "; ".join(errors))
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (not self.decay_to_init or self.weight_decay > 0,
             "decay_to_init pulls toward the starting values with strength weight_decay; set weight_decay > 0 "
             "(e.g. 0.1)"),
            (self.max_steps is None or self.max_steps >= 1,
             f"max_steps must be >= 1 or None, got {self.max_steps}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1 and self.grad_accum >= 1,
             f"batch_size and grad_accum must be >= 1, got {self.batch_size} and {self.grad_accum}"),
            (self.warmup_steps >= 0 and 0 <= self.warmup_ratio < 1, "warmup_steps must be >= 0 and "
             f"warmup_ratio in [0, 1), got {self.warmup_steps} and {self.warmup_ratio}"),
            (not (self.warmup_steps and self.warmup_ratio), "set warmup_steps or warmup_ratio, not both"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}"),
            (min(self.eval_every, self.save_every, self.log_every, self.num_workers) >= 0,
             "eval_every, save_every, log_every and num_workers must be >= 0"),
            (self.eval_batches is None or self.eval_batches >= 1,
             f"eval_batches must be >= 1 or None, got {self.eval_batches}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.bf16 in ("auto", True, False), f"bf16 must be 'auto', true or false, got {self.bf16!r}"),
            *_training_method_checks(self),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ConfigError("invalid TrainConfig: " + "; ".join(errors))

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the whole run."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * batches_per_epoch / self.grad_accum))


OPTIMIZERS = ("adamw", "galore", "mezo")
SCHEDULES = (None, "lisa", "ist", "mgpo")


def _training_method_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """(ok, message) of the optimizer and schedule fields and of the combinations that cannot work."""
    mezo = cfg.optimizer == "mezo"
    return [
        (cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}"),
        (cfg.schedule in SCHEDULES, f"schedule must be null, 'lisa', 'ist' or 'mgpo', got {cfg.schedule!r}"),
        (min(cfg.galore_rank, cfg.galore_update_gap, cfg.lisa_gamma, cfg.lisa_period) >= 1,
         "galore_rank, galore_update_gap, lisa_gamma and lisa_period must be >= 1"),
        (cfg.mezo_eps > 0 and 0 <= cfg.mezo_sparsity < 1,
         f"mezo_eps must be > 0 and mezo_sparsity in [0, 1), got {cfg.mezo_eps} and {cfg.mezo_sparsity}"),
        ((cfg.ist_num_update is None or cfg.ist_num_update >= 1) and cfg.ist_update_interval >= 0,
         "ist_num_update must be >= 1 or None and ist_update_interval >= 0"),
        (math.isfinite(cfg.mgpo_rho) and cfg.mgpo_rho >= 0 and 0 <= cfg.mgpo_beta < 1,
         f"mgpo_rho must be finite and >= 0 and mgpo_beta in [0, 1), got {cfg.mgpo_rho} and {cfg.mgpo_beta}"),
        (not cfg.decay_to_init or cfg.optimizer == "adamw",
         f"decay_to_init is AdamR, an AdamW variant; it does not combine with optimizer={cfg.optimizer!r}"),
        # MeZO forms no gradient: clipping one has no meaning, and a set value would be silently ignored
        (not mezo or cfg.max_grad_norm in (0, 1.0),
         f"optimizer=mezo forms no gradient, so max_grad_norm={cfg.max_grad_norm} would clip nothing; leave it "
         "at its default or set 0"),
        # MeZO perturbs every parameter it holds, trainable this step or not: a moving subset cannot work
        (not (mezo and cfg.schedule), f"schedule={cfg.schedule!r} works through gradients and "
         "optimizer state; optimizer=mezo perturbs every parameter it holds. Use adamw or galore with it"),
    ]
