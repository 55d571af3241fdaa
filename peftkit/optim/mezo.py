"""MeZO and Sparse MeZO: zeroth-order SGD that trains with forward passes only.

MeZO (Malladi et al., 2023, "Fine-Tuning Language Models with Just Forward Passes", arXiv:2305.17333)
estimates the gradient along one random direction z ~ N(0, I) by SPSA (Spall, 1992):

    ℓ± = L(θ ± ε z),    g = (ℓ+ − ℓ−) / (2ε),    θ ← θ − η g z,   then θ ← θ − η λ θ

E[g z] = ∇L + O(ε²), so g z is an unbiased-up-to-O(ε²) gradient estimate. z is never stored: it is
regenerated from the step's seed for each of the three in-place passes over the parameters
(θ += ε z; θ −= 2ε z; θ += (ε − η g) z, which restores θ and updates it in one pass), one chunk of
`CHUNK` elements at a time, so the extra memory is one chunk, not a copy of the parameters.

Sparse MeZO (Liu et al., 2024, "Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM
Fine-Tuning", arXiv:2402.15751) perturbs and updates only small-magnitude entries: with a per-tensor
threshold h fixed at the first step (the (1 − sparsity) quantile of |θ|, exact: the k-th smallest
|θ|, k = round((1 − sparsity) n)),

    m = 1[|θ| ≤ h]   (from the unperturbed θ of each step),   z ← z ⊙ m   in every pass.

m is computed once per step and kept packed (1 bit per entry) because recomputing it from a perturbed
θ could flip entries near h. The decay is masked too, so unselected entries never change.

Restoration is exact only up to rounding: x ↦ fl(x + ε z) is many-to-one in floating point (an entry
much smaller than ε z loses its low bits), so no in-place scheme can give θ back bit for bit without
storing what rounding dropped (a copy). θ comes back within a few ulps, and `replay` repeats the same
arithmetic, so a run replayed from its (seed, g) records is bitwise the run itself.

Losses come from `closure()` under `torch.no_grad()`; run the model in `eval()` (dropout off) so both
evaluations see the same function. The (seed, g) records are the whole trajectory: FedKSeed-style
federated training ships them instead of weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

CHUNK = 1 << 20
"""Elements of z generated at once (a multiple of 8, so packed masks split on byte boundaries)."""

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_STATE_KEYS = ("mezo_step", "mezo_rng", "mezo_seeds", "mezo_grads")


class ZerothOrderClosureError(RuntimeError):
    """The closure given to MeZO needs gradients (calls backward or builds an autograd graph)."""


def _chunks(p: torch.Tensor):
    """(start, flat view) pieces of `p` of at most CHUNK elements, in order."""
    flat = p.view(-1)  # parameters are contiguous; a non-contiguous one fails here, loudly
    for start in range(0, flat.numel(), CHUNK):
        yield start, flat[start:start + CHUNK]


def _pack(m: torch.Tensor) -> torch.Tensor:
    """Bool (n,) -> uint8 (ceil(n/8),), 8 entries a byte."""
    pad = (-m.numel()) % 8
    m8 = torch.cat([m, m.new_zeros(pad)]) if pad else m
    return (m8.view(-1, 8).to(torch.uint8) * _BITS.to(m.device)).sum(1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Entries start .. start+n of the bool mask `packed` holds (start a multiple of 8)."""
    part = packed[start // 8:(start + n + 7) // 8]
    return ((part.unsqueeze(1) & _BITS.to(part.device)) != 0).view(-1)[:n]


def kth_smallest_abs(p: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest |θ| of `p` (1 ≤ k ≤ n), exactly, in two passes of one chunk at a time.

    Non-negative floats order like their bit patterns read as integers, so a histogram of the top 16
    bits of |θ| finds the bin that holds the k-th value (pass 1); only that bin's entries are then
    gathered and ranked (pass 2). kthvalue on the whole tensor would copy it (and its int64 indices).
    """
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}[p.dtype]
    shift = torch.finfo(p.dtype).bits - 16
    top = lambda chunk: (chunk.abs().view(ints) >> shift).long()  # noqa: E731  sign bit is 0: 0 .. 2^15 - 1
    counts = sum(torch.bincount(top(chunk), minlength=1 << 15) for _, chunk in _chunks(p.detach()))
    cumulative = counts.cumsum(0)
    b = int(torch.searchsorted(cumulative, torch.tensor(k, device=cumulative.device)))  # first bin with ≥ k
    rank = k - (int(cumulative[b - 1]) if b > 0 else 0)
    inside = torch.cat([chunk.abs()[top(chunk) == b] for _, chunk in _chunks(p.detach())])
    return inside.double().kthvalue(rank).values.to(p.dtype)  # float64 holds every float exactly


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO); `sparsity > 0` makes it Sparse MeZO. See the module docstring.

    Args:
        params: parameters or parameter groups (full model or an adapter's trainable parameters).
        lr: η. MeZO's defaults: 1e-6..1e-7 full fine-tuning, 5e-5 LoRA, 1e-3..1e-2 prefix.
        eps: ε, the perturbation scale (1e-3 full / LoRA 1e-2 / prefix 1e-1); the same for all groups.
        weight_decay: λ (MeZO gives 0 to biases and norms: put those in a group with 0).
        sparsity: share of each tensor left untouched (Sparse MeZO); 0 is MeZO. In [0, 1).
        seed: seeds the stream the per-step seeds are drawn from.
        keep_records: keep the (seed, g) pair of every step in `records` (16 bytes a step).
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 sparsity: float = 0.0, seed: int = 0, keep_records: bool = True) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"MeZO needs lr >= 0, eps > 0, weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay, "sparsity": sparsity})
        for group in self.param_groups:
            if not 0.0 <= group["sparsity"] < 1.0:
                raise ValueError(f"sparsity is the share left untouched, in [0, 1); got {group['sparsity']}")
            if group["eps"] != self.param_groups[0]["eps"]:
                raise ValueError("all parameter groups need the same eps: g = (ℓ+ − ℓ−)/(2ε) is one scalar")
        self.steps = 0
        self.keep_records = keep_records
        self.records: list[tuple[int, float]] = []
        """(seed, g) of every step, in order: with the start θ and the hyperparameters, the whole run."""
        self._seeds = torch.Generator().manual_seed(seed)

    def _params(self):
        """(group, parameter) in the fixed order z is drawn in."""
        return [(group, p) for group in self.param_groups for p in group["params"]]

    def _masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """Packed m = 1[|θ| ≤ h] per Sparse-MeZO parameter, from θ now; h fixed at the first call."""
        masks = {}
        for group, p in self._params():
            if group["sparsity"] == 0:
                continue
            state = self.state[p]
            if "threshold" not in state:
                k = round((1 - group["sparsity"]) * p.numel())
                # k = n selects every entry for good (+inf), not only those below today's max |θ|
                h = kth_smallest_abs(p, k) if 0 < k < p.numel() else torch.tensor(-1.0 if k == 0 else math.inf)
                state["threshold"] = h.to(p.dtype)
            masks[p] = torch.cat([_pack(chunk.abs() <= state["threshold"]) for _, chunk in _chunks(p)])
        return masks

    @torch.no_grad()
    def _walk(self, seed: int, scale: Callable[[dict], float], masks: dict, decay: bool = False) -> None:
        """θ += scale(group) · z(seed) ⊙ m for every parameter; with decay, then θ ← θ − η λ (θ ⊙ m)."""
        generators: dict[torch.device, torch.Generator] = {}
        for group, p in self._params():
            gen = generators.get(p.device)
            if gen is None:  # one stream per device, seeded per pass: the same z in every pass
                gen = generators[p.device] = torch.Generator(p.device).manual_seed(seed)
            mask, s = masks.get(p), scale(group)
            shrink = group["lr"] * group["weight_decay"] if decay else 0.0
            for start, chunk in _chunks(p):
                z = torch.randn(chunk.numel(), generator=gen, dtype=p.dtype, device=p.device)
                m = None if mask is None else _unpack(mask, start, chunk.numel())
                if m is not None:
                    z.mul_(m)
                chunk.add_(z, alpha=s)
                if shrink:  # θ − ηλ (θ ⊙ m): the same arithmetic with or without a mask (m = 1 is exact)
                    chunk.sub_(chunk if m is None else chunk * m, alpha=shrink)

    def _evaluate(self, closure: Callable, watched: list[torch.Tensor]) -> float:
        """closure() under no_grad, checked: a scalar, finite, no graph built, no .grad allocated."""
        try:
            with torch.no_grad():
                loss = closure()
        except RuntimeError as err:
            if "does not require grad" not in str(err):
                raise
            raise ZerothOrderClosureError(
                "the MeZO closure called backward(); it must only run the forward pass and return the "
                "loss (MeZO estimates the gradient from two losses)") from err
        if any(p.grad is not None for p in watched):
            for p in watched:
                p.grad = None
            raise ZerothOrderClosureError("the MeZO closure allocated .grad (it ran backward under "
                                          "enable_grad); return the loss of a forward pass only")
        if isinstance(loss, torch.Tensor):
            if loss.requires_grad:
                raise ZerothOrderClosureError("the MeZO closure returned a loss with an autograd graph "
                                              "(it enabled grad); run the forward pass without it")
            if loss.numel() != 1:
                raise ValueError(f"the MeZO closure must return a scalar loss, got shape {tuple(loss.shape)}")
        value = float(loss)
        if not math.isfinite(value):
            raise ValueError(f"the MeZO closure returned a non-finite loss ({value}); θ was restored")
        return value

    @torch.no_grad()
    def step(self, closure: Callable | None = None, seed: int | None = None) -> torch.Tensor:
        """One MeZO step: two forward passes at θ ± εz, then θ ← θ − η g z. Returns (ℓ+ + ℓ−)/2.

        Args:
            closure: runs the model forward and returns the loss; no backward.
            seed: this step's seed (e.g. drawn from a shared pool, as FedKSeed does); default: the next
                one of the optimizer's seed stream.
        """
        if closure is None:
            raise TypeError("MeZO.step needs a closure that runs a forward pass and returns the loss, "
                            "e.g. opt.step(lambda: model(**batch).loss)")
        seed = self._next_seed() if seed is None else int(seed)
        eps = self.param_groups[0]["eps"]
        masks = self._masks()
        watched = [p for _, p in self._params() if p.grad is None]
        self._walk(seed, lambda g: eps, masks)
        at = 1.0  # where θ is, in units of εz: restored from there if the closure fails
        try:
            plus = self._evaluate(closure, watched)
            self._walk(seed, lambda g: -2 * eps, masks)
            at = -1.0
            minus = self._evaluate(closure, watched)
        except BaseException:
            self._walk(seed, lambda g: -at * eps, masks)
            raise
        grad = (plus - minus) / (2 * eps)
        self._finish(seed, grad, masks)
        return torch.tensor((plus + minus) / 2)

    def _finish(self, seed: int, grad: float, masks: dict) -> None:
        """Restore θ and update it in one pass (θ += (ε − η g) z, then decay); count and record the step."""
        eps = self.param_groups[0]["eps"]
        self._walk(seed, lambda group: eps - group["lr"] * grad, masks, decay=True)
        self.steps += 1
        if self.keep_records:
            self.records.append((seed, grad))

    @torch.no_grad()
    def apply_record(self, seed: int, grad: float, round_trip: bool = True) -> None:
        """Take a recorded step without any forward pass: bitwise what `step` did with this (seed, g).

        round_trip=False applies only θ ← θ − η g z (and the decay), as a federated server does with
        aggregated g's; it then differs from the run by the perturbations' rounding (a few ulps).
        """
        masks = self._masks()
        if round_trip:
            eps = self.param_groups[0]["eps"]
            self._walk(seed, lambda g: eps, masks)
            self._walk(seed, lambda g: -2 * eps, masks)
            self._finish(seed, grad, masks)
        else:
            self._walk(seed, lambda group: -group["lr"] * grad, masks, decay=True)
            self.steps += 1
            if self.keep_records:
                self.records.append((seed, grad))

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._seeds))

    def state_dict(self) -> dict:
        """Torch's state (Sparse MeZO thresholds) plus, under parameter 0, the step count, the seed
        stream's state and the records: tensors and plain numbers only, as checkpoints store them."""
        out = super().state_dict()
        seeds, grads = zip(*self.records, strict=True) if self.records else ((), ())
        out["state"].setdefault(0, {}).update({
            "mezo_step": self.steps, "mezo_rng": self._seeds.get_state(),
            "mezo_seeds": torch.tensor(seeds, dtype=torch.int64),
            "mezo_grads": torch.tensor(grads, dtype=torch.float64)})
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Inverse of `state_dict`; MeZO's own entries bypass torch's cast to the parameters' dtype."""
        state = {int(k): dict(v) for k, v in state_dict["state"].items()}
        own = {key: state.get(0, {}).pop(key) for key in _STATE_KEYS if key in state.get(0, {})}
        super().load_state_dict({**state_dict, "state": {k: v for k, v in state.items() if v}})
        if own:
            self.steps = int(own["mezo_step"])
            self._seeds.set_state(own["mezo_rng"].to("cpu", torch.uint8).clone())
            self.records = list(zip(own["mezo_seeds"].tolist(), own["mezo_grads"].double().tolist(),
                                    strict=True))


def replay(params: Iterable, records: Iterable[tuple[int, float]], round_trip: bool = True,
           **hyperparameters) -> None:
    """Re-run recorded MeZO steps on `params` in place, without data: θ_T from θ_0 and the (seed, g) pairs.

    Give the run's hyperparameters (lr, eps, weight_decay, sparsity; groups as in the run). Starting from
    the run's θ_0, the result is bitwise the run's θ_T (round_trip=True repeats the perturbations'
    rounding; see `MeZO.apply_record`).
    """
    opt = MeZO(params, keep_records=False, **hyperparameters)
    for seed, grad in records:
        opt.apply_record(seed, grad, round_trip=round_trip)
