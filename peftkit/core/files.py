"""Safe reading and writing of the files peftkit saves: atomic writes, checked safetensors headers.

Why not just `safetensors.torch.load_file`: an adapter file comes from elsewhere (a colleague, the
Hub, a half-finished copy), and a refusal should name the file and the tensor, happen before any
large allocation, and tell a file that lost its partner (weights from one save, config from another)
from one that was merely truncated. So the header is read and checked here first:

    8 bytes      little-endian u64: the header's length n (capped at MAX_HEADER)
    n bytes      JSON {tensor name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
    the rest     the tensors' bytes; each tensor's [begin, end) lies inside it, is shape x dtype size
                 long, and together they cover it exactly

and the file is hashed (sha256) while the header is checked, so that a config can record which
weights it belongs to; the tensors are then read by safetensors (one copy in memory), and a file
replaced in between (its inode, size or mtime changed) is refused.

Writes go to a temporary file in the same directory, are fsynced and then renamed over the target:
a reader sees the old file or the new one, never half of one. The temporary file is created with
mode 0o666 minus the process umask, as `open()` would, so a serving process of another user can read
what a training process wrote (`tempfile.mkstemp` would make it 0600).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

MAX_HEADER = 100 * 2**20
"""Largest safetensors header read (the limit safetensors itself applies): ~1 million tensors."""

DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
"""Bytes per element of the safetensors dtypes peftkit reads."""


class AdapterFileError(ValueError):
    """An adapter (or checkpoint) file is missing, truncated, corrupt or does not fit the model."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, fsync the file and rename it to `path`; the temporary file goes on failure.

    The temporary name is unique per call (pid plus random bits), so two processes saving to one
    directory never write into each other's file; the last rename wins.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as for open()
        mode = stat.S_IMODE(tmp.stat().st_mode)
        write(str(tmp))
        os.chmod(tmp, mode)  # a writer that replaced the file (safetensors makes its own, 0600) loses its mode
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, metadata, sha256 of the file) of a safetensors file whose header was checked first.

    Raises AdapterFileError, naming the file and the tensor, for a missing or truncated file, a header
    that is not JSON or is too long, an unknown dtype, or offsets that do not fit the shapes or the file.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist")
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        size = before.st_size
        first = f.read(8)
        if len(first) < 8:
            raise AdapterFileError(f"{path} is truncated or corrupt (only {size} bytes); save it again")
        (n,) = struct.unpack("<Q", first)
        if n < 2 or n > min(MAX_HEADER, size - 8):
            raise AdapterFileError(f"{path} is truncated or corrupt: its header claims {n} bytes of a {size}-byte "
                                  f"file (at most {MAX_HEADER}); save it again")
        header_bytes = f.read(n)
        metadata = _check_entries(path, _parse_header(path, header_bytes), size - 8 - n)
        digest = hashlib.sha256(first + header_bytes)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path} is truncated or corrupt ({err}); save it again") from err
    after = path.stat()
    if (after.st_ino, after.st_size, after.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
        raise AdapterFileError(f"{path} changed while it was read (another process saving to it?); load it again")
    return tensors, metadata, digest.hexdigest()


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path} is truncated or corrupt: its header is not JSON ({err}); save it again") from err
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path} is corrupt: its header is a {type(header).__name__}, not a JSON object")
    return header


def _check_entries(path: Path, header: dict, data_size: int) -> dict[str, str]:
    """Check every tensor entry against the data size; returns the `__metadata__` strings."""
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path} is corrupt: its __metadata__ must map names to strings")
    spans = []
    for name, entry in header.items():
        dtype, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets")) if isinstance(
            entry, dict) else (None, None, None)
        if dtype not in DTYPE_SIZES:
            raise AdapterFileError(f"{path}: tensor {name!r} has dtype {dtype!r}; peftkit reads "
                                  f"{', '.join(DTYPE_SIZES)}")
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
            raise AdapterFileError(f"{path}: tensor {name!r} needs a list of non-negative integers as shape and "
                                  f"[begin, end] as data_offsets, got shape={shape!r}, data_offsets={offsets!r}")
        begin, end = offsets
        if not begin <= end <= data_size or end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise AdapterFileError(
                f"{path} is truncated or corrupt: tensor {name!r} ({dtype} {shape}) needs "
                f"{math.prod(shape) * DTYPE_SIZES[dtype]} bytes but its offsets are [{begin}, {end}) of "
                f"{data_size}; save it again")
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise AdapterFileError(f"{path} is corrupt: tensor data overlaps or has gaps at byte {begin}")
        covered = end
    if covered != data_size:
        raise AdapterFileError(f"{path} is truncated or corrupt: tensors cover {covered} of {data_size} bytes")
    return metadata


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def check_finite(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a file whose floating-point tensors hold NaN or infinity, naming the first few."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterFileError(f"{path}: tensor(s) {', '.join(sorted(bad)[:5])} hold NaN or infinite values; the "
                              "adapter was saved from a diverged run: load an earlier checkpoint or train again")


# --- one tensor per (module, parameter) pattern -------------------------------------------------
def _block_pattern(key: str) -> tuple[str, int] | None:
    parts = key.split(".")
    i = next((j for j, part in enumerate(parts) if part.isdigit()), None)
    return None if i is None else (".".join(parts[:i] + ["*"] + parts[i + 1 :]), int(parts[i]))


def stack_blocks(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Stack tensors whose names differ only in the block index into one (n_blocks, ...) tensor.

    "model.layers.0.self_attn.q_proj.lora_A" ... "model.layers.5...." become one tensor under
    "model.layers.*.self_attn.q_proj.lora_A" when their shapes and dtypes agree. Why: the safetensors
    header costs ~100 bytes per tensor, which for a LoRA on every linear layer of a deep model is more
    than the adapter's whole config; stacking keeps the file at its tensors' size plus a few KiB.
    Returns the new dict and {pattern: block indices in stacking order}.
    """
    groups: dict[str, list[tuple[int, str]]] = {}
    for key in tensors:
        found = _block_pattern(key)
        if found is not None:
            groups.setdefault(found[0], []).append((found[1], key))
    out, index = {}, {}
    for pattern, members in groups.items():
        if len(members) > 1 and len({(tensors[k].shape, tensors[k].dtype) for _, k in members}) == 1:
            members.sort()
            out[pattern] = torch.stack([tensors[k] for _, k in members])
            index[pattern] = [i for i, _ in members]
    done = {pattern.replace("*", str(i), 1) for pattern, idx in index.items() for i in idx}
    out.update({k: v for k, v in tensors.items() if k not in done})
    return out, index


def unstack_blocks(tensors: dict[str, torch.Tensor], index: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Inverse of `stack_blocks`."""
    out = {k: v for k, v in tensors.items() if k not in index}
    for pattern, indices in index.items():
        stacked = tensors.get(pattern)
        if stacked is None or stacked.shape[0] != len(indices):
            raise AdapterFileError(f"stacked tensor {pattern} does not match its index {indices}; save the adapter again")
        out.update({pattern.replace("*", str(i), 1): t.clone() for i, t in zip(indices, stacked.unbind(0), strict=True)})
    return out


def read_json(path: Path) -> dict:
    """A JSON object from a file, or an AdapterFileError naming the file."""
    data = _json_of(path)
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def read_json_names(path: Path) -> list[str]:
    """A JSON list of adapter names from a file (`adapter_order.json`), or an AdapterFileError naming it."""
    data = _json_of(path)
    if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
        raise AdapterFileError(f"{path} must hold a JSON list of adapter names")
    return data


def _json_of(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err}); save the adapter again") from err
