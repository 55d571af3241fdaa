"""A base weight's fingerprint: enough to tell the base an adapter was trained on from another one.

An adapter only means something on the base it was trained on, so `save` records a fingerprint of
every adapted base weight and `load` refuses a base whose weights differ. The fingerprint of a
weight W, viewed as a matrix (d_out, rest), is three numbers computed in float64:

    ||W||_F,   u1' W v1 / ||W||_F,   u2' W v2 / ||W||_F

with fixed pseudo-random probe vectors u (one entry per row) and v (one per column), drawn by a
hash of the position, so the same on every machine and torch version. The norm catches a rescaled
weight; the projections weight every entry by its row and column, so they catch permuted rows or
columns and any drift: a change dW moves a projection by about ||dW|| / (3 ||W||), and the exact
comparison accepts 1e-6, so a 0.3% drift of every entry is ~1,000x over the threshold.

Dtype round trips. A bf16 or fp16 copy of the base is the same base (users train in fp32 and serve
in bf16), but its rounded weights differ from the fp32 ones by ~0.1% per entry. So the fingerprint
is also recorded for the weight rounded to the 16-bit dtypes, and `load` compares like with like:

* same dtype: exact (1e-6);
* one side fp32/fp64, the other 16-bit (or fp64 against fp32): the wider side rounded to the
  narrower one, exact;
* fp16 against bf16: both rounded to bf16, the norm at 1e-3 and the projections at 4e-3. Rounding fp16
  to bf16 differs from rounding the original in ~1 entry in 16 by one bf16 step, which moves a
  projection by up to ~1.4e-3 on a 64 x 64 weight; so this pair is compared coarsely: a rescaling by
  0.3% or permuted rows are still caught, a random 0.3% drift of every entry often is not.

A quantized copy of the base (NF4, int8) differs by more than rounding and is refused; load it with
`allow_different_base=True`. Fingerprints saved before these (`[sum, sum |w|]`) are still compared as
they were (1e-3 relative).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

EXACT = 1e-6
"""Tolerance (relative to ||W||) when both sides hold the same values up to float64 summation order."""

LOOSE = (1e-3, 4e-3)
"""Tolerances (norm, projections) for an fp16 copy against a bf16 one (see the module docstring)."""

LEGACY_RTOL = 1e-3
"""Tolerance of the old `[sum, sum |w|]` fingerprints, relative to sum |w|."""

WIDE = ("float32", "float64")
SIXTEEN = ("bfloat16", "float16")
CHUNK = 1 << 22
"""Entries per float64 block: bounds the extra memory of fingerprinting a big embedding (32 MiB)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _variants(dtype: str) -> list[str]:
    """The dtypes a weight of `dtype` is fingerprinted in: its own and its roundings to 16 bits."""
    if dtype == "float64":
        return [dtype, "float32", *SIXTEEN]
    if dtype == "float32":
        return [dtype, *SIXTEEN]
    return [dtype, "bfloat16"] if dtype == "float16" else [dtype]


@functools.lru_cache(maxsize=64)
def _probe(n: int, seed: int) -> torch.Tensor:
    """(2, n) float64 in [-1, 1): splitmix64 of (position, seed); no torch RNG involved."""
    with np.errstate(over="ignore"):
        x = np.arange(2 * n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x632BE59BD9B4E019)
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    uniform = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return torch.from_numpy(2.0 * uniform - 1.0).reshape(2, n)


def _numbers(w: torch.Tensor, dtype: str | None) -> list[float]:
    """[||W||, u1'Wv1/||W||, u2'Wv2/||W||] of `w` (2-D), rounded to `dtype` first when given."""
    u, v = _probe(w.shape[0], 1).to(w.device), _probe(w.shape[1], 2).to(w.device)
    rows = max(1, CHUNK // max(w.shape[1], 1))
    square, proj = 0.0, [0.0, 0.0]
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows]
        block = (block.to(getattr(torch, dtype)) if dtype else block).double()  # (rows, columns)
        flat = block.reshape(-1)
        square += float(torch.dot(flat, flat))
        for k in range(2):  # two matrix-vector products: faster than one (rows, columns) @ (columns, 2)
            proj[k] += float(torch.dot(torch.mv(block, v[k]), u[k, start:start + rows]))
    norm = math.sqrt(square)
    scaled = [p / norm if norm > 0 else 0.0 for p in proj]
    return [float(f"{norm:.10g}"), *(round(p, 10) for p in scaled)]


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(-1, 1)


def weight_fingerprint(weight: torch.Tensor) -> dict:
    """{"dtype": name, <dtype>: [norm, p1, p2] for the weight and each 16-bit rounding} (JSON-ready)."""
    w = _matrix(weight.detach())
    own = dtype_name(w.dtype)
    if not w.is_floating_point():
        return {"dtype": own, own: _numbers(w.double(), None)}
    return {"dtype": own, **{d: _numbers(w, None if d == own else d) for d in _variants(own)}}


def legacy_checksum(weight: torch.Tensor) -> list[float]:
    """The fingerprint peftkit saved before 0.x: sum and sum of |w| (misses permutations and small drift)."""
    w = weight.detach().double()
    return [float(w.sum()), float(w.abs().sum())]


def same_weight(saved: list | dict, weight: torch.Tensor) -> bool:
    """True when `weight` matches a saved fingerprint (new or legacy), per the rules in the module docstring."""
    if isinstance(saved, list):
        now = legacy_checksum(weight)
        scale = max(abs(saved[1]), 1e-12)
        return all(abs(a - b) <= LEGACY_RTOL * scale for a, b in zip(saved, now, strict=True))
    w = _matrix(weight.detach())
    mine, theirs = dtype_name(w.dtype), saved["dtype"]
    if mine == theirs or (theirs in WIDE and mine in _variants(theirs)):
        dtype, tol = mine, (EXACT, EXACT)
    elif mine in WIDE and theirs in _variants(mine):
        dtype, tol = theirs, (EXACT, EXACT)
    elif "bfloat16" in saved and mine in SIXTEEN:
        dtype, tol = "bfloat16", LOOSE
    else:
        return False
    if dtype not in saved:
        return False
    now = _numbers(w if w.is_floating_point() else w.double(), None if dtype == mine else dtype)
    norm = max(saved[dtype][0], 1e-30)
    return abs(now[0] - saved[dtype][0]) <= tol[0] * norm and all(
        abs(a - b) <= tol[1] for a, b in zip(now[1:], saved[dtype][1:], strict=True))


def check_entry(entry) -> str | None:
    """Why a saved fingerprint entry `[shape, checksum]` is malformed, or None when it is well formed."""
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in entry[0])):
        return "must be [shape, checksum] with a list of integers as shape"
    checksum = entry[1]
    if isinstance(checksum, list):
        ok = len(checksum) == 2 and all(_finite(x) for x in checksum)
        return None if ok else "a legacy checksum must be two finite numbers"
    if not isinstance(checksum, dict) or not isinstance(checksum.get("dtype"), str):
        return "checksum must be a list or an object with a 'dtype'"
    rows = [v for k, v in checksum.items() if k != "dtype"]
    if checksum["dtype"] not in checksum or not all(
            isinstance(r, list) and len(r) == 3 and all(_finite(x) for x in r) for r in rows):
        return "checksum must hold three finite numbers per dtype, including its own dtype"
    return None


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def same_record(saved: list | dict, now: list | dict) -> bool:
    """True when two saved fingerprints (of one weight, at two times) describe the same base weight.

    For a resumed run: the live model's fingerprint was taken at `apply`, before an init such as PiSSA's
    rewrote the base, so records are compared, not a record against today's weight. Records of one
    format and dtype compare like `same_weight`'s exact case; a pair that cannot be compared (a legacy
    record, another dtype) counts as the same, as nothing says otherwise.
    """
    if isinstance(saved, list) or isinstance(now, list) or saved.get("dtype") != now.get("dtype"):
        return True
    dtype = saved["dtype"]
    if dtype not in saved or dtype not in now:
        return True
    (n0, *p0), (n1, *p1) = saved[dtype], now[dtype]
    return abs(n0 - n1) <= EXACT * max(n0, 1e-30) and all(abs(a - b) <= EXACT for a, b in zip(p0, p1, strict=True))
