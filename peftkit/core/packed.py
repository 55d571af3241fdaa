"""Compact storage of sparse ternary tensors (values in {−s, 0, +s}) inside a safetensors file.

ComPEFT (merging/compeft.py) leaves each tensor with one scalar s, a support (which entries are non-zero)
and a sign per support entry. Stored densely that is 16 or 32 bits per entry; stored here it is

    positions: min(numel bits as a bitmap,  Golomb-Rice coded gaps)   + nnz sign bits   + s in the JSON

per tensor, whichever of the two position codes is smaller. Golomb-Rice with parameter k codes the gap
g = pᵢ − pᵢ₋₁ − 1 between consecutive positions as ⌊g / 2ᵏ⌋ in unary (that many 1 bits and a 0) and
g mod 2ᵏ in k plain bits; k is chosen per tensor by exact bit count. The unary parts of all gaps are
stored first and the remainders after them (same bit count as interleaving them), so decoding is
vectorised: the 0 bits of the unary part are exactly the code ends.

In a file, the tensor `key` becomes two uint8 tensors `key@positions` and `key@signs`, and the config
JSON's "packed" field records, per key, [shape, dtype, scale, nnz, coding, rice_k, unary_bytes] (`RECORD`;
a list, not an object, so the field names are not repeated for every tensor; files that hold objects
still read). `unpack_tensors` checks every length, count and position before building a tensor, and
raises AdapterFileError naming the tensor. This module knows no method: it stores what it is given.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .files import AdapterFileError

SUFFIXES = ("@positions", "@signs")
RECORD = ("shape", "dtype", "scale", "nnz", "coding", "rice_k", "unary_bytes")
"""The fields of one tensor's packing record, in the order the JSON list holds them."""
MAX_NUMEL = 1 << 32
"""Largest tensor a packed record may describe (the JSON is not covered by the weights' digest)."""
_FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# --- position codes ------------------------------------------------------------------------------
def bitmap_encode(mask: np.ndarray) -> np.ndarray:
    """One bit per entry (1 = kept), most significant bit first, zero-padded to whole bytes."""
    return np.packbits(mask.astype(bool))


def _unpack_exact(data: np.ndarray, nbits: int, what: str) -> np.ndarray:
    """The first `nbits` bits of `data`, which must be exactly ceil(nbits / 8) bytes with zero padding."""
    if data.size != -(-nbits // 8):
        raise ValueError(f"{what} holds {data.size} bytes, expected {-(-nbits // 8)}")
    bits = np.unpackbits(data)
    if bits[nbits:].any():
        raise ValueError(f"{what} has non-zero padding bits")
    return bits[:nbits]


def bitmap_decode(data: np.ndarray, numel: int) -> np.ndarray:
    """Positions (int64, increasing) of the 1 bits of a bitmap of `numel` entries."""
    return np.flatnonzero(_unpack_exact(data, numel, "the bitmap")).astype(np.int64)


def gaps_of(positions: np.ndarray) -> np.ndarray:
    """g_i = p_i − p_{i−1} − 1 with p_{−1} = −1 (the zeros skipped before each kept entry)."""
    return np.diff(positions.astype(np.int64), prepend=-1) - 1


def rice_bits(gaps: np.ndarray, k: int) -> int:
    """Exact length in bits of the Rice code with parameter k: Σ ⌊g / 2ᵏ⌋ + n·(k + 1)."""
    return int((gaps >> k).sum()) + gaps.size * (k + 1)


def best_rice_k(gaps: np.ndarray) -> int:
    """The k in 0..40 with the fewest bits (the cost is convex in k, so a scan is cheap and exact)."""
    return min(range(41), key=lambda k: (rice_bits(gaps, k), k))


def rice_encode(positions: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """(bytes, bytes of the unary part): unary quotients (1-padded), then k-bit remainders (0-padded)."""
    gaps = gaps_of(positions)
    q, r = gaps >> k, gaps & ((1 << k) - 1)
    ends = np.cumsum(q + 1) - 1  # index of each code's terminating 0 bit
    unary = np.ones(-(-int(ends[-1] + 1) // 8) * 8 if gaps.size else 0, dtype=np.uint8)
    unary[ends] = 0
    rem = ((r[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)  # (n·k,) MSB first
    head = np.packbits(unary)
    return np.concatenate([head, np.packbits(rem)]), int(head.size)


def rice_decode(data: np.ndarray, unary_bytes: int, count: int, k: int, numel: int) -> np.ndarray:
    """Inverse of `rice_encode`; refuses a stream whose lengths, count or positions do not fit."""
    if not 0 <= unary_bytes <= data.size:
        raise ValueError(f"the unary part claims {unary_bytes} bytes of a {data.size}-byte stream")
    unary = np.unpackbits(data[:unary_bytes])
    ends = np.flatnonzero(unary == 0)
    if ends.size != count:
        raise ValueError(f"the unary part holds {ends.size} codes, expected {count}")
    if unary.size - (int(ends[-1]) + 1 if count else 0) >= 8:
        raise ValueError("the unary part is longer than its codes")
    rem_bits = _unpack_exact(data[unary_bytes:], count * k, "the remainder part").reshape(count, k).astype(np.int64)
    r = (rem_bits << np.arange(k - 1, -1, -1)).sum(axis=1) if k else np.zeros(count, dtype=np.int64)
    q = np.diff(ends, prepend=-1) - 1
    positions = np.cumsum((q << k) + r + 1) - 1
    if count and positions[-1] >= numel:
        raise ValueError(f"a position ({int(positions[-1])}) lies outside the tensor's {numel} entries")
    return positions.astype(np.int64)


# --- one ternary tensor ----------------------------------------------------------------------------
def ternary_scale(t: torch.Tensor) -> float:
    """s of a tensor whose entries are all in {−s, 0, +s} (s = 0 for an all-zero tensor); else ValueError."""
    mags = t[t != 0].abs().unique()
    if mags.numel() > 1:
        raise ValueError(f"it holds {mags.numel()} distinct non-zero magnitudes, not one (±s)")
    return float(mags[0]) if mags.numel() else 0.0


def pack_ternary(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray, dict]:
    """(position bytes, sign bytes, info) of a ternary tensor; positions coded the smaller way."""
    if t.dtype not in _FLOATS.values():
        raise ValueError(f"its dtype is {t.dtype}; only float tensors can be stored as ternary")
    scale = ternary_scale(t)
    flat = t.detach().cpu().reshape(-1)
    positions = torch.nonzero(flat).reshape(-1).numpy()
    signs = np.packbits((flat[positions] < 0).numpy())
    info = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "scale": scale,
            "nnz": int(positions.size), "coding": "bitmap", "rice_k": 0, "unary_bytes": 0}
    k = best_rice_k(gaps_of(positions)) if positions.size else 0
    if not positions.size or rice_bits(gaps_of(positions), k) >= -(-flat.numel() // 8) * 8:
        return bitmap_encode((flat != 0).numpy()), signs, info
    coded, unary_bytes = rice_encode(positions, k)
    return coded, signs, {**info, "coding": "rice", "rice_k": k, "unary_bytes": unary_bytes}


def unpack_ternary(positions_bytes: np.ndarray, sign_bytes: np.ndarray, info: dict) -> torch.Tensor:
    """The dense tensor; ValueError when the info or the bytes are inconsistent."""
    shape, nnz = info["shape"], info["nnz"]
    numel = math.prod(shape)
    if not 0 <= nnz <= numel <= MAX_NUMEL:
        raise ValueError(f"nnz {nnz} does not fit {numel} entries (at most {MAX_NUMEL} per tensor)")
    if info["coding"] == "bitmap":
        positions = bitmap_decode(positions_bytes, numel)
        if positions.size != nnz:
            raise ValueError(f"the bitmap holds {positions.size} entries, the JSON says nnz {nnz}")
    else:
        positions = rice_decode(positions_bytes, info["unary_bytes"], nnz, info["rice_k"], numel)
    negative = _unpack_exact(sign_bytes, nnz, "the sign bits").astype(bool)
    dtype = _FLOATS[info["dtype"]]
    values = torch.full((nnz,), info["scale"], dtype=dtype)
    values[torch.from_numpy(negative)] *= -1
    out = torch.zeros(numel, dtype=dtype)
    out[torch.from_numpy(positions)] = values
    return out.reshape(shape)


# --- a whole adapter -------------------------------------------------------------------------------
def pack_tensors(tensors: dict[str, torch.Tensor], keys: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Replace `keys` (ternary tensors) by their packed uint8 pair; returns (tensors, the "packed" JSON)."""
    out, packed = dict(tensors), {}
    for key in keys:
        if key not in tensors:
            raise AdapterFileError(f"cannot pack {key!r}: the adapter has no such tensor")
        try:
            pos, signs, info = pack_ternary(tensors[key])
            packed[key] = [info[f] for f in RECORD]
        except ValueError as err:
            raise AdapterFileError(f"cannot store {key!r} as ternary: {err}; leave it out of 'pack_ternary' "
                                   "to store it dense") from err
        del out[key]
        out[key + SUFFIXES[0]], out[key + SUFFIXES[1]] = torch.from_numpy(pos), torch.from_numpy(signs)
    return out, packed


def unpack_tensors(path, tensors: dict[str, torch.Tensor], packed) -> dict[str, torch.Tensor]:
    """Decode the keys that `packed` (the config's "packed" field) lists; refuse any inconsistency."""
    if not isinstance(packed, dict):
        raise AdapterFileError(f"{path}: the config's 'packed' field must be an object; save the adapter again")
    out = dict(tensors)
    for key, info in packed.items():
        if isinstance(info, list) and len(info) == len(RECORD):
            info = dict(zip(RECORD, info, strict=True))
        problem = _check_info(info)
        stored = [out.pop(key + s, None) for s in SUFFIXES]
        if problem is None and any(t is None or t.dtype != torch.uint8 or t.dim() != 1 for t in stored):
            problem = f"needs 1-D uint8 tensors {key}{SUFFIXES[0]} and {key}{SUFFIXES[1]} in the file"
        if problem is None and key in out:
            problem = "is stored both dense and packed"
        if problem is None:
            try:
                out[key] = unpack_ternary(stored[0].numpy(), stored[1].numpy(), info)
            except ValueError as err:
                problem = str(err)
        if problem is not None:
            raise AdapterFileError(f"{path}: packed tensor {key!r} is corrupt: {problem}; compress the adapter again")
    leftover = sorted(k for k in out if k.endswith(SUFFIXES))
    if leftover:
        raise AdapterFileError(f"{path}: tensors {leftover[:5]} look packed but the config does not list them; "
                               "compress the adapter again")
    return out


def _check_info(info) -> str | None:
    """What is wrong with one tensor's packing record, or None."""
    if not isinstance(info, dict):
        return f"its record must be a list of {len(RECORD)} values {list(RECORD)}"
    ints = ("nnz", "rice_k", "unary_bytes")
    if any(not isinstance(info.get(f), int) or isinstance(info.get(f), bool) or info[f] < 0 for f in ints):
        return f"fields {ints} must be non-negative integers"
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"shape must be a list of non-negative integers, got {shape!r:.60}"
    scale = info.get("scale")
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 0:
        return f"scale must be a finite number >= 0, got {scale!r:.40}"
    if info.get("dtype") not in _FLOATS:
        return f"dtype must be one of {sorted(_FLOATS)}, got {info.get('dtype')!r:.40}"
    if info.get("coding") not in ("bitmap", "rice") or info["rice_k"] > 40:
        return "coding must be 'bitmap' or 'rice' (with rice_k <= 40)"
    return None

