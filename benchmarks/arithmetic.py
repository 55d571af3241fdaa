"""The arithmetic each configuration needs: extra multiply-adds (MACs) per training token and extra memory,
from the model's shape, to put next to the measured step time and peak memory (scaling.py).

Counting rules (per token, T = batch x seq tokens per step, the model's linears as (d_in, d_out)):

* a linear costs d_in d_out MACs forward, d_in d_out for its input gradient and d_in d_out for its weight
  gradient; causal attention costs seq d forward (seq / 2 keys on average, QK^T and AV) and 2 seq d backward;
* floor = forward + the input gradients (no weight gradient): layers (3 seq d + 2 Σ d_in d_out) + 2 d V;
* an adapter's product form costs 3x its forward MACs in training (forward, input gradient, its own
  gradients); work done once per step, independent of the tokens (building a weight, a norm), is divided by T;
* memory beyond the floor = trainable parameters x 16 bytes (fp32 value, gradient, two AdamW moments;
  full fine-tuning: 12, the values are the model's) + the tensors the method saves for backward.

Predicted step x floor = (floor + extra) / floor: the share of the arithmetic, which a method matches only
when its extra products run as fast as the model's own large GEMMs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from protocol import ALL_LINEAR

FLOAT = 4  # bytes of an fp32 value


@dataclass
class Shape:
    """The model (Llama) and the step whose arithmetic is counted."""

    d: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int

    @classmethod
    def of(cls, model: dict, seq: int, batch: int) -> Shape:
        return cls(model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"],
                   model["num_attention_heads"], model["num_key_value_heads"], model["vocab_size"], seq, batch)

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    def linears(self, names: list[str] = ALL_LINEAR) -> list[tuple[int, int]]:
        """(d_in, d_out) of the named projections of one layer."""
        kv = self.d // self.heads * self.kv_heads
        shapes = {"q_proj": (self.d, self.d), "k_proj": (self.d, kv), "v_proj": (self.d, kv),
                  "o_proj": (self.d, self.d), "gate_proj": (self.d, self.inter), "up_proj": (self.d, self.inter),
                  "down_proj": (self.inter, self.d)}
        return [shapes[n] for n in names]

    def forward(self, seq: int | None = None) -> float:
        """Forward MACs per token at sequence `seq` (default: the step's)."""
        seq = seq or self.seq
        return self.layers * (sum(i * o for i, o in self.linears()) + seq * self.d) + self.d * self.vocab

    def floor(self, seq: int | None = None) -> float:
        """Floor training MACs per token: forward plus input gradients."""
        seq = seq or self.seq
        return self.layers * (3 * seq * self.d + 2 * sum(i * o for i, o in self.linears())) + 2 * self.d * self.vocab


@dataclass
class Cost:
    macs: Callable[[Shape, int], float]
    """Extra training MACs per token, for rank r."""
    saved: Callable[[Shape, int], float]
    """Extra bytes saved for backward per step (beyond the trainable parameters' 16 bytes each)."""
    macs_text: str
    saved_text: str = "-"
    default_rank: int = 0


def over(sh: Shape, names: list[str], per_linear: Callable[[int, int], float]) -> float:
    """Σ over the layers and the named projections of per_linear(d_in, d_out)."""
    return sh.layers * sum(per_linear(i, o) for i, o in sh.linears(names))


def longer_sequence(sh: Shape, n: int) -> float:
    """Extra floor MACs per real token when n soft tokens are prepended (every layer runs on seq + n)."""
    return sh.floor(sh.seq + n) * (sh.seq + n) / sh.seq - sh.floor()


def kron_macs(d_in: int, d_out: int) -> float:
    """DiffuseKronA's forward A X B^T with the default factors (the largest divisor <= sqrt for A)."""
    def small(n: int) -> int:
        return max(f for f in range(1, math.isqrt(n) + 1) if n % f == 0)
    a1, a2 = small(d_out), small(d_in)
    return a1 * d_in + d_out * (d_in // a2)


QV, KVD = ["q_proj", "v_proj"], ["k_proj", "v_proj", "down_proj"]
LOWRANK = "3 r (d_in + d_out) per adapted linear"
COSTS: dict[str, Cost] = {
    "floor": Cost(lambda sh, r: 0, lambda sh, r: 0, "0 (reference)"),
    "full": Cost(lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: i * o) + sh.d * sh.vocab, lambda sh, r: 0,
                 "every weight gradient: layers Σ d_in d_out + d V", "12 bytes per parameter"),
    "lora8-qv": Cost(lambda sh, r: over(sh, QV, lambda i, o: 3 * r * (i + o)),
                     lambda sh, r: over(sh, QV, lambda i, o: sh.tokens * r * FLOAT), LOWRANK + " (q, v)",
                     "T r floats per adapted linear", 8),
    "lora16-all": Cost(lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: 3 * r * (i + o)),
                       lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: sh.tokens * r * FLOAT), LOWRANK,
                       "T r floats per adapted linear", 16),
    "dora8-all": Cost(lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: 3 * r * (i + o) + (i * o * r + o * r * r) / sh.tokens),
                      lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: sh.tokens * o * FLOAT),
                      LOWRANK + " + the row norm, (d_in d_out r + d_out r^2) / T",
                      "at most T d_out floats per adapted linear (the output, for d(scale); shared where the "
                      "next op keeps it; h is recomputed)", 8),
    "adalora": Cost(lambda sh, r: over(sh, QV, lambda i, o: 3 * (r * 3 // 2) * (i + o) + 3 * (r * 3 // 2) ** 2 * (i + o) / sh.tokens),
                    lambda sh, r: over(sh, QV, lambda i, o: sh.tokens * (r * 3 // 2) * FLOAT),
                    "3 r0 (d_in + d_out) + the orthogonality term 3 r0^2 (d_in + d_out) / T (q, v; r0 = 1.5 r)",
                    "T r0 floats per adapted linear", 8),
    "ia3": Cost(lambda sh, r: 3 * sh.layers * sum(o if n != "down_proj" else i for n, (i, o) in
                                                  zip(KVD, sh.linears(KVD), strict=True)),
                lambda sh, r: over(sh, KVD, lambda i, o: sh.tokens * o * FLOAT),
                "3 (d_k + d_v + d_ff) per layer (elementwise)", "T d_out floats per scaled output"),
    "prompt20": Cost(lambda sh, r: longer_sequence(sh, 20), lambda sh, r: 0,
                     "the floor on seq + 20 tokens, per real token", "floor activations x 20 / seq"),
    "randlora": Cost(lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: i * o + 3 * max(i, o) * min(i, o)
                                        * math.ceil(min(i, o) / r) * r / sh.tokens),
                     lambda sh, r: 0, "weight gradient d_in d_out + building W, 3 d_max (N r) d_min / T",
                     "one transient d_out x d_in weight", 32),
    "bone": Cost(lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: i * o + 3 * i * o * r / sh.tokens), lambda sh, r: 0,
                 "weight gradient d_in d_out + 3 d_in d_out r / T", "one transient d_out x d_in weight", 64),
    "kron": Cost(lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: 3 * kron_macs(i, o)), lambda sh, r: 0,
                 "3 (a1 d_in + d_out b2) per adapted linear (A X B^T per token)"),
    "svfit16": Cost(lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: 3 * r * (i + o)),
                    lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: sh.tokens * r * FLOAT), LOWRANK,
                    "T r floats per adapted linear", 16),
    "hydra8": Cost(lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: 6 * r * (i + o) + 2 * r * i * o / sh.tokens),
                   lambda sh, r: over(sh, ALL_LINEAR, lambda i, o: sh.tokens * 2 * r * FLOAT),
                   "3 (2r) (d_in + d_out) + A_s W0 twice, 2 r d_in d_out / T", "T 2r floats per adapted linear", 8),
}
for _kind, _sites in (("houlsby", ["o_proj", "down_proj"]), ("pfeiffer", ["down_proj"]), ("parallel", ["o_proj"])):
    # parallel wraps the MLP (d -> d), counted as one d x d site like o_proj
    COSTS[_kind] = Cost(lambda sh, m, s=_sites: sh.layers * len(s) * 3 * m * 2 * sh.d,
                        lambda sh, m, s=_sites: sh.layers * len(s) * sh.tokens * (2 * m + sh.d) * FLOAT,
                        f"3 m (2 d) per adapter, {len(_sites)} per layer",
                        "T (2m + d) floats per adapter (D's input, its output, the activation)", 64)
COSTS["loldu16"] = COSTS["svfit16"]


def predicted(config: str, sh: Shape, rank: int | None, trainable: int, floor_peak_mb: float) -> dict | None:
    """Predicted step x floor and extra memory (MB) over the floor; None for a configuration not counted."""
    cost = COSTS.get(config)
    if cost is None:
        return None
    r = rank or cost.default_rank
    param_bytes = trainable * (12 if config == "full" else 16)
    saved = cost.saved(sh, r)
    if config == "prompt20":  # activations grow with the sequence: the floor's, measured, scaled
        saved = floor_peak_mb * 2**20 * 20 / sh.seq
    return {"x_floor": (sh.floor() + cost.macs(sh, r)) / sh.floor(),
            "extra_mb": (param_bytes + saved) / 2**20}
