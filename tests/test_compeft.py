"""ComPEFT (methods.md §8.2): top-k, ternary, one scalar per tensor; the compact file format that stores it."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import peftkit
from peftkit.cli import main
from peftkit.core.files import read_safetensors
from peftkit.core.io import CONFIG_FILE, WEIGHTS_FILE, read_adapter, write_adapter
from peftkit.core.packed import (
    RECORD,
    bitmap_decode,
    bitmap_encode,
    gaps_of,
    pack_ternary,
    rice_bits,
    rice_decode,
    rice_encode,
    unpack_ternary,
)
from peftkit.merging.compeft import compeft, compress, compression_ratio, ternarize, top_k_mask

from tiny_models import example_inputs, output_of, tiny_llama


def _tau(shape=(40, 25), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.333, 1.0])
def test_nnz_is_ceil_k_numel(density):
    tau = _tau()
    assert int((compeft(tau, density, 1.0) != 0).sum()) == math.ceil(density * tau.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_three_values_scale_and_signs(dtype):
    tau, alpha = _tau().to(dtype), 2.5
    out = compeft(tau, 0.2, alpha)
    scale = (alpha * tau.float().std()).to(dtype)  # σ of the ORIGINAL τ, not of the kept entries
    assert out.dtype == dtype
    assert set(out.unique().tolist()) == {-float(scale), 0.0, float(scale)}
    support = out != 0
    assert torch.equal(torch.sign(out[support]), torch.sign(tau[support]))
    kept = tau.abs()[support].min()
    assert bool((tau.abs()[~support] <= kept).all())  # the support is the top-k of |τ|


def test_full_density_with_exact_magnitudes_recovers_the_input():
    tau = _tau()
    assert torch.equal(ternarize(tau, top_k_mask(tau, 1.0), tau.abs()), tau)


def _random_ternary(numel: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=g) < density
    signs = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
    return (0.37 * signs * mask).reshape(numel // 8, 8) if numel % 8 == 0 else 0.37 * signs * mask


@pytest.mark.parametrize("numel,density", [(1000, 0.0), (1000, 0.002), (4096, 0.05), (999, 0.2), (1001, 0.6),
                                           (64, 1.0), (100_000, 0.01)])
@pytest.mark.parametrize("seed", [0, 1])
def test_packing_round_trips_random_masks(numel, density, seed):
    t = _random_ternary(numel, density, seed)
    positions, signs, info = pack_ternary(t)
    assert torch.equal(unpack_ternary(positions, signs, json.loads(json.dumps(info))), t)


@pytest.mark.parametrize("density", [0.001, 0.01, 0.05, 0.2, 0.5, 0.9])
def test_both_position_codes_round_trip(density):
    mask = np.random.default_rng(3).random(20_000) < density
    pos = np.flatnonzero(mask)
    assert np.array_equal(bitmap_decode(bitmap_encode(mask), mask.size), pos)
    for k in (0, 1, 3, 7):
        coded, unary = rice_encode(pos, k)
        assert coded.size == -(-int((gaps_of(pos) >> k).sum() + pos.size) // 8) + -(-pos.size * k // 8)
        assert np.array_equal(rice_decode(coded, unary, pos.size, k, mask.size), pos)


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2])
def test_position_cost_is_near_the_entropy_bound(density):
    """Rice-coded positions cost about numel·H(k) bits (H the binary entropy): log2(1/k) + ~1.5 per kept entry."""
    t = _random_ternary(200_000, density, 0)
    positions, signs, info = pack_ternary(t)
    nnz = info["nnz"]
    d = nnz / t.numel()  # the entropy of this mask's own density
    entropy = t.numel() * -(d * math.log2(d) + (1 - d) * math.log2(1 - d))
    assert info["coding"] == "rice" and signs.size == -(-nnz // 8)
    assert 0.97 * entropy <= positions.size * 8 <= entropy + 0.2 * nnz + 16  # Rice: ≤ ~0.1 bit/entry over Golomb
    bits_per_entry = (positions.size + signs.size) * 8 / t.numel()  # positions + sign bits
    assert bits_per_entry < 32 * density * 0.5  # over twice smaller than the fp32 values of the kept entries alone


def test_dense_support_uses_the_bitmap():
    _, _, info = pack_ternary(_random_ternary(4096, 0.6, 0))
    assert info["coding"] == "bitmap"


def _lora_adapter(tmp_path):
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    peftkit.save(model, tmp_path / "dense")
    return read_adapter(tmp_path / "dense")


def test_compressed_adapter_stores_compactly_and_loads_back(tmp_path):
    dense = _lora_adapter(tmp_path)
    config, meta, tensors = compress(dense, density=0.05, alpha=2.0)
    write_adapter(tmp_path / "small", config, tensors, meta)
    _, back_meta, back = read_adapter(tmp_path / "small")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert back_meta["compression"] == {"how": "compeft", "density": 0.05, "alpha": 2.0, "exclude": []}
    # the file is its tensors' bits plus the safetensors header: positions, sign bits, nothing else
    path = tmp_path / "small" / WEIGHTS_FILE
    stored, _, _ = read_safetensors(path)
    assert all(t.dtype == torch.uint8 for t in stored.values())
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    code_bytes = 0
    for key in meta["pack_ternary"]:
        info, t = dict(zip(RECORD, back_meta["packed"][key], strict=True)), tensors[key]
        gaps, k = gaps_of(torch.nonzero(t.reshape(-1)).reshape(-1).numpy()), info["rice_k"]
        unary_bits = int((gaps >> k).sum()) + gaps.size  # the Rice code: unary quotients, then k-bit remainders
        assert unary_bits + gaps.size * k == rice_bits(gaps, k)
        position_bytes = [-(-t.numel() // 8)] if info["coding"] == "bitmap" else [-(-unary_bits // 8),
                                                                                  -(-gaps.size * k // 8)]
        code_bytes += sum(position_bytes) + -(-info["nnz"] // 8)  # + one sign bit per kept entry
    assert path.stat().st_size - 8 - header == code_bytes
    ratio = compression_ratio(dense[2], tensors, meta["pack_ternary"])
    assert ratio > 10  # 5% density: ~log2(20) + 2.5 bits per kept entry instead of 32 bits per entry
    model = peftkit.load(tiny_llama(), tmp_path / "small")  # the base fingerprint travels with it
    want = tiny_llama()
    peftkit.apply(want, peftkit.LoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))
    peftkit.core.io.load_adapter_state_dict(want, tensors)
    inputs = example_inputs("llama")
    assert torch.equal(output_of(model, inputs), output_of(want, inputs))


def test_exclude_keeps_tensors_dense_and_exact(tmp_path):
    dense = _lora_adapter(tmp_path)
    _, meta, tensors = compress(dense, density=0.1, exclude=["down_proj"])
    kept = [k for k in tensors if "down_proj" in k]
    assert kept and not set(kept) & set(meta["pack_ternary"])
    assert all(torch.equal(tensors[k], dense[2][k]) for k in kept)


@pytest.mark.parametrize("kwargs,match", [({"density": 0.0}, "density"), ({"density": 1.5}, "density"),
                                          ({"alpha": 0.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
                                          ({"how": "zip"}, "unknown compression")])
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(peftkit.ConfigError, match=match):
        compress(_lora_adapter(tmp_path), **kwargs)


def _corrupt(directory, edit_tensors=None, edit_packed=None):
    """Rewrite a compressed adapter's file or JSON as an attacker or a bad disk would (digest removed)."""
    path, meta_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    tensors, metadata, _ = read_safetensors(path)
    meta = json.loads(meta_path.read_text())
    del meta["weights_sha256"]  # "weights edited on purpose": the decoder's own checks must catch the rest
    if edit_tensors:
        edit_tensors(tensors)
        save_file(tensors, str(path), metadata=metadata)
    if edit_packed:
        edit_packed(meta["packed"])
    meta_path.write_text(json.dumps(meta))


def _first(d: dict, suffix: str) -> str:
    """A key with that suffix, one not stacked across blocks if there is one (core/files.py stacks equal shapes)."""
    return min((k for k in d if k.endswith(suffix)), key=lambda k: ("*" in k, k))


def _flip_bit(tensors):
    key = _first(tensors, "@positions")
    t = tensors[key].clone()
    t[0] ^= 1
    tensors[key] = t


def _get(packed: dict, field: str):
    return packed[sorted(packed)[0]][RECORD.index(field)]


def _set(packed: dict, field: str, value) -> None:
    packed[sorted(packed)[0]][RECORD.index(field)] = value


CORRUPTIONS = {
    "position bit flipped": (_flip_bit, None, "corrupt"),
    "signs truncated": (lambda t: t.__setitem__(_first(t, "@signs"), t[_first(t, "@signs")][..., :-1].clone()),
                        None, "sign bits"),
    "positions not uint8": (lambda t: t.__setitem__(_first(t, "@positions"), t[_first(t, "@positions")].short()),
                            None, "needs 1-D uint8"),
    "nnz too large": (None, lambda p: _set(p, "nnz", _get(p, "nnz") + 1), "corrupt"),
    "shape too small": (None, lambda p: _set(p, "shape", [1, 1]), "corrupt"),
    "unknown coding": (None, lambda p: _set(p, "coding", "lz4"), "coding"),
    "negative scale": (None, lambda p: _set(p, "scale", -1.0), "scale"),
    "record dropped": (None, lambda p: p.pop(sorted(p)[0]), "does not list"),
    "record truncated": (None, lambda p: p[sorted(p)[0]].pop(), "must be a list of 7"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_packed_tensor_is_refused(tmp_path, case):
    dense = _lora_adapter(tmp_path)
    config, meta, tensors = compress(dense, density=0.05)
    write_adapter(tmp_path / "small", config, tensors, meta)
    edit_tensors, edit_packed, match = CORRUPTIONS[case]
    _corrupt(tmp_path / "small", edit_tensors, edit_packed)
    with pytest.raises(peftkit.AdapterFileError, match=match):
        peftkit.load(tiny_llama(), tmp_path / "small")


def test_rice_position_out_of_range_is_refused():
    pos = np.array([3, 10, 40])
    coded, unary = rice_encode(pos, 2)
    with pytest.raises(ValueError, match="outside"):
        rice_decode(coded, unary, 3, 2, numel=40)
    assert np.array_equal(rice_decode(coded, unary, 3, 2, numel=41), pos)


def test_write_refuses_a_tensor_that_is_not_ternary(tmp_path):
    config, meta, tensors = _lora_adapter(tmp_path)
    with pytest.raises(peftkit.AdapterFileError, match="distinct non-zero magnitudes"):
        write_adapter(tmp_path / "bad", config, tensors, {**meta, "pack_ternary": sorted(tensors)[:1]})


def test_cli_compress(tmp_path, capsys):
    _lora_adapter(tmp_path)
    assert main(["compress", "--adapter", str(tmp_path / "dense"), "--out", str(tmp_path / "c"),
                 "--density", "0.1", "--alpha", "2"]) == 0
    assert "compeft adapter written" in capsys.readouterr().out
    assert read_adapter(tmp_path / "c")[1]["compression"]["density"] == 0.1
    assert main(["compress", "--adapter", str(tmp_path / "dense"), "--out", str(tmp_path / "d"),
                 "--density", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error: density must be in (0, 1]") and err.count("\n") == 1


def test_records_written_as_objects_still_load(tmp_path):
    """Files from before the packing record became a list (an object per tensor) read the same."""
    dense = _lora_adapter(tmp_path)
    config, meta, tensors = compress(dense, density=0.1)
    write_adapter(tmp_path / "small", config, tensors, meta)
    _corrupt(tmp_path / "small", edit_packed=lambda p: p.update({k: dict(zip(RECORD, v, strict=True))
                                                                 for k, v in p.items()}))
    _, _, back = read_adapter(tmp_path / "small")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
