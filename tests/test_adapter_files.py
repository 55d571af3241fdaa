"""Adapter files under faults and bad input: one adapter per directory, weights and config as one unit,
headers checked before reading, no NaN/inf, fields of the right type, regexes that cannot hang, and a
base fingerprint that tells a drifted or permuted base from a bf16 copy of the same one.

Every failing load must leave the model exactly as it was (`assert_unchanged`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import struct
import time

import pytest
import torch
from safetensors.torch import save_file
from unchanged import assert_unchanged, snapshot

import peftkit
from peftkit.core import files
from peftkit.core.files import sha256_file
from peftkit.core.io import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from peftkit.core.registry import registered_methods

from tiny_models import example_inputs, tiny_llama

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LORA = dict(r=2, targets=["q_proj", "v_proj"])


def _adapted(seed: int = 0, dtype=torch.float32, dropout: float = 0.0):
    """A tiny llama with a LoRA whose factors are random (so outputs differ from the base)."""
    model = tiny_llama().to(dtype)
    peftkit.apply(model, peftkit.LoRAConfig(**LORA, dropout=dropout))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def _refused(directory, error, match, model=None, **kwargs):
    model = tiny_llama() if model is None else model
    before = snapshot(model)
    with pytest.raises(error, match=match):
        peftkit.load(model, directory, **kwargs)
    assert_unchanged(model, before)


def _outputs(model):
    with torch.no_grad():
        return model(**example_inputs("llama")).logits


def _edit_json(path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _write_tensors(directory, tensors, name=WEIGHTS_FILE) -> None:
    """Replace the weights with `tensors` (unstacked) and record their digest, as a consistent save would."""
    save_file(tensors, directory / name)
    if name == WEIGHTS_FILE:
        _edit_json(directory / CONFIG_FILE, lambda m: m.update(weights_sha256=sha256_file(directory / name)))


# --- one adapter per directory, saved as one unit -------------------------------------------------
@pytest.mark.parametrize("first, second", [("peftkit", "peft"), ("peft", "peftkit")])
def test_saving_one_format_over_the_other_replaces_it(tmp_path, first, second):
    peftkit.save(_adapted(seed=1), tmp_path, format=first)
    newer = _adapted(seed=2)
    peftkit.save(newer, tmp_path, format=second)
    ours = {CONFIG_FILE, WEIGHTS_FILE}
    assert {p.name for p in tmp_path.iterdir()} == (ours if second == "peftkit" else {PEFT_CONFIG, PEFT_WEIGHTS})
    torch.testing.assert_close(_outputs(peftkit.load(tiny_llama(), tmp_path)), _outputs(newer))


def test_a_directory_with_both_formats_is_refused(tmp_path):
    peftkit.save(_adapted(seed=1), tmp_path / "a", format="peft")
    peftkit.save(_adapted(seed=2), tmp_path / "b")
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    _refused(tmp_path / "b", peftkit.AdapterFileError, "holds two adapters.*peftkit_adapter.json.*adapter_config.json")


@pytest.mark.parametrize("fmt, moved", [("peftkit", WEIGHTS_FILE), ("peftkit", CONFIG_FILE),
                                        ("peft", PEFT_WEIGHTS), ("peft", PEFT_CONFIG)])
def test_weights_and_config_of_different_saves_are_refused(tmp_path, fmt, moved):
    """What a save killed between its two renames, or two saves racing, leaves: one save's file with the other's."""
    peftkit.save(_adapted(seed=1), tmp_path / "a", format=fmt)
    peftkit.save(_adapted(seed=2, dropout=0.1), tmp_path / "b", format=fmt)  # weights and config both differ
    (tmp_path / "a" / moved).write_bytes((tmp_path / "b" / moved).read_bytes())
    _refused(tmp_path / "a", peftkit.AdapterFileError, "from different saves")


def test_a_save_killed_between_weights_and_config_is_refused(tmp_path, monkeypatch):
    peftkit.save(_adapted(seed=1), tmp_path)
    real, calls = files.atomic_write, []

    def killed_at_the_config(path, write):
        calls.append(path)
        if str(path).endswith(".json"):
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr("peftkit.core.io.atomic_write", killed_at_the_config)
    with pytest.raises(KeyboardInterrupt):
        peftkit.save(_adapted(seed=2), tmp_path)
    monkeypatch.undo()
    assert len(calls) == 2 and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    _refused(tmp_path, peftkit.AdapterFileError, "from different saves.*save the adapter again")


@pytest.mark.parametrize("fmt", ["peftkit", "peft"])
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_follow_the_umask(tmp_path, fmt, umask):
    old = os.umask(umask)
    try:
        peftkit.save(_adapted(), tmp_path, format=fmt)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert len(modes) == 2 and set(modes.values()) == {0o666 & ~umask}, modes


# --- safetensors headers checked before anything is read -----------------------------------------
def _header_file(path, header: dict, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


@pytest.mark.parametrize("header, data, length, match", [
    pytest.param({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 16]}}, bytes(16), None,
                 r"'w' \(F32 \[100000, 100000\]\) needs 40000000000 bytes", id="huge-shape"),
    pytest.param({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}, bytes(16), None,
                 "offsets are", id="offsets-past-the-end"),
    pytest.param({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), None,
                 "gaps at byte 8", id="gap"),
    pytest.param({"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16), None,
                 "dtype 'C64'", id="unknown-dtype"),
    pytest.param({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None,
                 "non-negative integers", id="negative-shape"),
    pytest.param({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), 1 << 62,
                 "header claims", id="huge-header-length"),
    pytest.param({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), 5,
                 "not JSON", id="cut-header"),
])
def test_bad_headers_are_refused_before_reading_the_tensors(saved_dir, monkeypatch, header, data, length, match):
    def no_allocation(_):
        raise AssertionError("tensors were deserialized before the header was checked")

    monkeypatch.setattr(files, "load_file", no_allocation)
    _header_file(saved_dir / WEIGHTS_FILE, header, data, length)
    _edit_json(saved_dir / CONFIG_FILE, lambda m: m.pop("weights_sha256"))
    _refused(saved_dir, peftkit.AdapterFileError, f"adapter.safetensors.*{match}")


def test_flipped_bytes_in_the_tensors_are_refused(saved_dir):
    raw = bytearray((saved_dir / WEIGHTS_FILE).read_bytes())
    raw[-3] ^= 0x40  # inside the last tensor: the header and length stay valid
    (saved_dir / WEIGHTS_FILE).write_bytes(bytes(raw))
    _refused(saved_dir, peftkit.AdapterFileError, "from different saves")


def test_weights_replaced_while_being_read_are_refused(saved_dir, monkeypatch):
    """A save renaming new weights in between the digest and the read must not pass the old digest off."""
    real = files.load_file
    other = saved_dir / "other"
    peftkit.save(_adapted(seed=3), other)

    def replaced_first(path):
        os.replace(other / WEIGHTS_FILE, path)
        return real(path)

    monkeypatch.setattr(files, "load_file", replaced_first)
    _refused(saved_dir, peftkit.AdapterFileError, "changed while it was read")


@pytest.fixture
def saved_dir(tmp_path):
    peftkit.save(_adapted(), tmp_path)
    return tmp_path


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_tensors_where_floats_are_expected_are_refused(saved_dir, dtype):
    tensors = read_adapter(saved_dir)[2]
    key = "model.layers.0.self_attn.q_proj.lora_A"
    tensors[key] = torch.ones_like(tensors[key]).to(dtype)
    _write_tensors(saved_dir, tensors)
    _refused(saved_dir, peftkit.AdapterFileError, f"types do not fit.*q_proj.lora_A: file {dtype}")


# --- non-finite values ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["peftkit", "peft"])
@pytest.mark.parametrize("value", [float("nan"), -float("inf")])
def test_non_finite_tensors_are_refused(tmp_path, fmt, value):
    peftkit.save(_adapted(), tmp_path, format=fmt)
    name = WEIGHTS_FILE if fmt == "peftkit" else PEFT_WEIGHTS
    tensors = read_adapter(tmp_path)[2] if fmt == "peftkit" else files.read_safetensors(tmp_path / name)[0]
    key = sorted(k for k in tensors if "v_proj" in k)[-1]
    tensors[key][0, 0] = value
    if fmt == "peft":
        save_file(tensors, tmp_path / name)
    else:
        _write_tensors(tmp_path, tensors)
    _refused(tmp_path, peftkit.AdapterFileError, f"{name}: tensor\\(s\\) {key} hold NaN or infinite")


@pytest.mark.parametrize("fmt, field, literal", [
    ("peftkit", "alpha", "NaN"), ("peftkit", "alpha", "Infinity"), ("peftkit", "dropout", "-Infinity"),
    ("peft", "lora_alpha", "NaN"), ("peft", "lora_alpha", "Infinity"),
])
def test_non_finite_scales_in_files_are_refused(tmp_path, fmt, field, literal):
    peftkit.save(_adapted(), tmp_path, format=fmt)
    path = tmp_path / (CONFIG_FILE if fmt == "peftkit" else PEFT_CONFIG)
    meta = json.loads(path.read_text())
    (meta["config"] if fmt == "peftkit" else meta)[field] = 12345.0
    path.write_text(json.dumps(meta).replace("12345.0", literal))  # JSON as Python writes NaN/Infinity
    if fmt == "peft":
        _drop_config_digest(tmp_path)
    _refused(tmp_path, peftkit.ConfigError, f"{path.name}.*{field.removeprefix('lora_')}.*(finite|got -?(inf|nan))")


def _drop_config_digest(directory):
    """Rewrite the peft weights without peftkit's config digest (as if peft itself had written them)."""
    tensors = files.read_safetensors(directory / PEFT_WEIGHTS)[0]
    save_file(tensors, directory / PEFT_WEIGHTS, metadata={"format": "pt"})


def _float_fields():
    for method in registered_methods().values():
        try:
            cfg = method.config_cls()
        except peftkit.ConfigError:
            continue
        for f in dataclasses.fields(cfg):
            if isinstance(getattr(cfg, f.name), float):
                yield pytest.param(type(cfg), f.name, id=f"{method.name}.{f.name}")


@pytest.mark.parametrize("cls, name", list(_float_fields()))
def test_every_float_field_refuses_non_finite_values(cls, name):
    """The method's own range check may speak first ("dropout must be in [0, 1)"); either names the field."""
    for value in (float("nan"), float("inf"), -float("inf")):
        for make in (lambda fields: cls(**fields), cls.from_dict):
            with pytest.raises(peftkit.ConfigError, match=f"{name}.*(finite|got .*(nan|inf))"):
                make({name: value})


def test_non_finite_values_inside_patterns_are_refused():
    with pytest.raises(peftkit.ConfigError, match=r"LoRAConfig.alpha_pattern\['v_proj'\] must be a finite"):
        peftkit.LoRAConfig(alpha_pattern={"v_proj": math.nan})


# --- wrong JSON types name the file and the field ---------------------------------------------
@pytest.mark.parametrize("edit, error, match", [
    (lambda m: m["config"].update(r="eight"), peftkit.ConfigError, r"LoRAConfig.r must be a number"),
    (lambda m: m["config"].update(r=1.5), peftkit.ConfigError, r"rank must be a positive integer, got r=1.5"),
    (lambda m: m["config"].update(r=True), peftkit.ConfigError, r"LoRAConfig.r must be a number"),
    (lambda m: m["config"].update(targets=5), peftkit.ConfigError, r"LoRAConfig.targets must be"),
    (lambda m: m["config"].update(targets=[1, 2]), peftkit.ConfigError, r"LoRAConfig.targets"),
    (lambda m: m["config"].update(layers="0"), peftkit.ConfigError, r"layers must be"),
    (lambda m: m["config"].update(rank_pattern=[]), peftkit.ConfigError, r"LoRAConfig.rank_pattern must be"),
    (lambda m: m["config"].update(rslora="no"), peftkit.ConfigError, r"LoRAConfig.rslora must be true or false"),
    (lambda m: m["config"].update(method=5), peftkit.ConfigError, r"unknown method 5"),
    (lambda m: m["config"].update(method=["lora"]), peftkit.ConfigError, r"unknown method \['lora'\]"),
    (lambda m: m["config"].update(method="lorax"), peftkit.ConfigError, r"unknown method 'lorax'"),
    (lambda m: m.update(config=[]), peftkit.ConfigError, r"must be a mapping"),
    (lambda m: m.pop("config"), peftkit.AdapterFileError, r"no 'config' field"),
    (lambda m: m.update(base_fingerprint=5), peftkit.AdapterFileError, r"'base_fingerprint' must be an object"),
    (lambda m: m["base_fingerprint"].update({"model.layers.0.self_attn.q_proj": [[32, 32], "x"]}),
     peftkit.AdapterFileError, r"'base_fingerprint' of 'model.layers.0.self_attn.q_proj'"),
    (lambda m: m.update(weights_sha256=7), peftkit.AdapterFileError, r"'weights_sha256' must be a hex string"),
])
def test_wrong_json_types_name_the_file_and_the_field(saved_dir, edit, error, match):
    _edit_json(saved_dir / CONFIG_FILE, edit)
    _refused(saved_dir, error, f"{CONFIG_FILE}.*{match}")


def test_a_json_file_that_is_not_an_object_is_refused(saved_dir):
    (saved_dir / CONFIG_FILE).write_text("[1, 2]")
    _refused(saved_dir, peftkit.AdapterFileError, f"{CONFIG_FILE} must hold a JSON object, not a list")


@pytest.mark.parametrize("field, value", [
    ("r", "eight"), ("r", 1.5), ("target_modules", 5), ("lora_alpha", "x"), ("rank_pattern", []),
    ("init_lora_weights", [1]), ("use_rslora", "yes"), ("modules_to_save", 5), ("peft_type", 5),
])
def test_wrong_types_in_peft_files_name_the_file_and_the_field(tmp_path, field, value):
    peftkit.save(_adapted(), tmp_path, format="peft")
    _edit_json(tmp_path / PEFT_CONFIG, lambda m: m.update({field: value}))
    _drop_config_digest(tmp_path)
    _refused(tmp_path, (peftkit.ConfigError, peftkit.AdapterFileError), f"{PEFT_CONFIG}.*({field}|LoRAConfig)")


# --- target regexes ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["peftkit", "peft"])
def test_a_backtracking_target_regex_cannot_hang_load(tmp_path, fmt):
    peftkit.save(_adapted(), tmp_path, format=fmt)
    catastrophic = "(?:(?:.|..)+)+\\d"  # exponential on any module name that does not end in a digit
    if fmt == "peftkit":
        _edit_json(tmp_path / CONFIG_FILE, lambda m: m["config"].update(targets=["re:" + catastrophic]))
    else:
        _edit_json(tmp_path / PEFT_CONFIG, lambda m: m.update(target_modules=catastrophic))
        _drop_config_digest(tmp_path)
    start = time.monotonic()
    _refused(tmp_path, peftkit.ConfigError, "took over .* s on module")
    assert time.monotonic() - start < 10


def test_an_invalid_target_regex_is_a_config_error():
    _refused_apply = tiny_llama()
    with pytest.raises(peftkit.ConfigError, match=r"target 're:\(q' is not a valid regular expression"):
        peftkit.apply(_refused_apply, peftkit.LoRAConfig(targets=["re:(q"]))


# --- the base fingerprint ---------------------------------------------------------------------
def _changed_base(change):
    model = tiny_llama()
    with torch.no_grad():
        change(model.model.layers[1].self_attn.v_proj.weight)
    return model


@pytest.mark.parametrize("change", [
    pytest.param(lambda w: w.mul_(1.003), id="scaled-0.3%"),
    pytest.param(lambda w: w.mul_(1 + 0.003 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))),
                 id="drift-0.3%"),
    pytest.param(lambda w: w.copy_(w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(5))]),
                 id="rows-permuted"),
    pytest.param(lambda w: w.copy_(w[[1, 0, *range(2, w.shape[0])]]), id="two-rows-swapped"),
    pytest.param(lambda w: w.copy_(w[:, [1, 0, *range(2, w.shape[1])]]), id="two-columns-swapped"),
])
def test_a_drifted_or_permuted_base_is_refused(saved_dir, change):
    model = _changed_base(change)
    _refused(saved_dir, peftkit.AdapterFileError, r"different base model.*layers.1.self_attn.v_proj \(weights differ",
             model=model)
    peftkit.load(model, saved_dir, allow_different_base=True)


@pytest.mark.parametrize("saved_dtype, loaded_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
    (torch.float64, torch.float32),
])
def test_a_copy_of_the_base_in_another_dtype_is_the_same_base(tmp_path, saved_dtype, loaded_dtype):
    peftkit.save(_adapted(dtype=saved_dtype), tmp_path)
    model = peftkit.load(tiny_llama().to(loaded_dtype), tmp_path)
    assert peftkit.has_adapter(model)


@pytest.mark.parametrize("loaded_dtype", [torch.float32, torch.bfloat16])
def test_a_drifted_base_in_another_dtype_is_refused(tmp_path, loaded_dtype):
    peftkit.save(_adapted(), tmp_path)
    model = _changed_base(lambda w: w.mul_(1.01)).to(loaded_dtype)
    _refused(tmp_path, peftkit.AdapterFileError, r"v_proj \(weights differ", model=model)


def test_old_two_number_fingerprints_still_load_and_compare(saved_dir):
    from peftkit.core.fingerprint import legacy_checksum

    base = tiny_llama()

    def legacy(meta):
        for name, entry in meta["base_fingerprint"].items():
            entry[1] = legacy_checksum(base.get_submodule(name).weight)

    _edit_json(saved_dir / CONFIG_FILE, legacy)
    _edit_json(saved_dir / CONFIG_FILE, lambda m: m.pop("weights_sha256"))  # and no digest: an old file
    assert peftkit.has_adapter(peftkit.load(tiny_llama(), saved_dir))
    _refused(saved_dir, peftkit.AdapterFileError, r"v_proj \(weights differ", model=_changed_base(lambda w: w.add_(1)))


def test_fingerprint_probes_do_not_depend_on_torch_rng():
    from peftkit.core.fingerprint import weight_fingerprint

    w = torch.arange(12.0).reshape(3, 4)
    torch.manual_seed(123)
    first = weight_fingerprint(w)
    torch.manual_seed(456)
    assert weight_fingerprint(w) == first and first["dtype"] == "float32" and set(first) == {
        "dtype", "float32", "bfloat16", "float16"}


@pytest.mark.parametrize("fmt", ["peftkit", "peft"])
def test_non_finite_weights_are_not_saved_over_a_good_adapter(tmp_path, fmt):
    model = _adapted()
    peftkit.save(model, tmp_path, format=fmt)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    layer = next(m for m in model.modules() if hasattr(m, "lora_B"))
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(peftkit.AdapterFileError, match="not saved.*lora_B.*NaN or infinite"):
        peftkit.save(model, tmp_path, format=fmt)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(peftkit.AdapterFileError, match="not saved"):
        peftkit.save(model, tmp_path / "new", format=fmt)
    assert not (tmp_path / "new").exists()
