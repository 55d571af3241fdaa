"""Records from files, checked before any tokenizing: every refusal names the file, the row and the field.

    records = read_records("data.csv")          # Records: a list of dicts that knows where each came from
    records.where(4)                            # "data.csv line 6" (the header is line 1)
    ids, names = label_ids(records, "label")    # class ids, and {name: id} when labels were names

Why up front: a bad row found mid-training (an empty label cell, a class the head does not have, a
number where text belongs) costs the steps before it and surfaces as an index error deep inside the
model, or worse, not at all (an empty cell once re-mapped every label to a different class).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

from . import assets

BUILTINS = ("rotten_tomatoes", "shakespeare")
SPLITS = ("train", "validation", "test")
SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
_INT = re.compile(r"[+-]?\d+")


class DataError(ValueError):
    """The data cannot be used as given; the message names the file, the row and the field."""


class DataUnavailableError(DataError, RuntimeError):
    """A Hugging Face dataset could not be loaded (offline, unknown name or split); a RuntimeError too."""


class Records(list):
    """A list of record dicts that remembers where each came from, so errors can name the row.

    Attributes:
        source: the file path or data set name.
        positions: 1-based line (JSONL, CSV) or row numbers of each record; None numbers them 1, 2, ...
        unit: "line", "row" or "record", the word `where` uses.
    """

    def __init__(self, items=(), source: str = "records", positions: list[int] | None = None,
                 unit: str = "record") -> None:
        super().__init__(items)
        self.source, self.unit = source, unit
        self.positions = list(positions) if positions is not None else None

    def where(self, i: int) -> str:
        """Where record i came from: "data.csv line 7"."""
        return f"{self.source} {self.unit} {self.positions[i] if self.positions is not None else i + 1}"

    def __getitem__(self, key):
        if isinstance(key, slice):  # the held-out tail of a file keeps its line numbers
            positions = None if self.positions is None else self.positions[key]
            return Records(super().__getitem__(key), self.source, positions, self.unit)
        return super().__getitem__(key)


def where(records: list[dict], i: int) -> str:
    """Where record i came from, also for a plain list."""
    return records.where(i) if isinstance(records, Records) else f"record {i + 1}"


def source_of(records: list[dict]) -> str:
    return records.source if isinstance(records, Records) else "the records"


def read_records(source: str, split: str | None = None) -> Records:
    """Records from a local file, a built-in offline data set, or a Hugging Face dataset.

    Args:
        source: a `.csv`, `.jsonl`, `.json` or `.parquet` file (UTF-8, a byte-order mark is fine);
            "rotten_tomatoes" (fields `text`, `label`: 1 fresh, 0 rotten; see
            `assets.rotten_tomatoes_split`); "shakespeare" (fields `text`, `work`, one record per work;
            see `assets.shakespeare_split`); otherwise a dataset name for `datasets.load_dataset`,
            which needs the network and the `datasets` package.
        split: "train", "validation" or "test" for the built-ins (default "train"), any split name
            for a Hugging Face dataset; a local file is one split, so it is ignored there.

    Raises:
        FileNotFoundError: a file path that does not exist.
        DataError: an unknown split of a built-in; a file that is empty, not UTF-8, not valid JSON on
            some line, or a CSV row with more or fewer fields than its header (the message says where).
        DataUnavailableError: a Hugging Face dataset that could not be loaded (also a RuntimeError).
    """
    if source in BUILTINS:
        return _read_builtin(source, split or "train")
    path = Path(source).expanduser()
    if path.suffix.lower() in SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"no data file at {path}")
        records = _read_file(path)
        if not records:
            raise DataError(f"{path} holds no records")
        return records
    if path.is_file():
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUFFIXES)}")
    return _read_hub(source, split or "train")


def _read_builtin(name: str, split: str) -> Records:
    if split not in SPLITS:
        raise DataError(f"{name} has splits {', '.join(SPLITS)}; got split={split!r}")
    if name == "rotten_tomatoes":
        rows = [{"text": t, "label": y} for t, y in assets.rotten_tomatoes_split()[split]]
    else:
        rows = [{"text": text, "work": work} for work, text in assets.shakespeare_split()[split]]
    return Records(rows, f"{name} ({split})")


def _read_file(path: Path) -> Records:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM would otherwise prefix the first field name
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    if suffix == ".csv":
        return _read_csv(path, text)
    if suffix == ".json" and text.lstrip().startswith(("[", "{")):
        records = _read_json(path, text)
        if records is not None:
            return records
    return _read_jsonl(path, text)


def _read_csv(path: Path, text: str) -> Records:
    """CSV rows as string-valued dicts (datasets coerce labels), each numbered by its line."""
    reader = csv.DictReader(io.StringIO(text, newline=""))  # not splitlines: U+2028 may sit in a quoted field
    rows, lines = [], []
    try:
        for row in reader:
            if None in row or None in row.values():  # restkey / restval: the row does not fit the header
                count = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
                raise DataError(f"{path} line {reader.line_num}: {count} fields where the header "
                                f"({', '.join(reader.fieldnames)}) has {len(reader.fieldnames)}; quote text that "
                                "holds commas")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({err})") from err
    return Records(rows, str(path), lines, "line")


def _read_json(path: Path, text: str) -> Records | None:
    """A JSON array of objects or an object of columns; None when the file holds JSON lines instead."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{"):
            return None  # one object per line
        raise DataError(f"{path} line {err.lineno} column {err.colno}: not valid JSON ({err.msg})") from err
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{path}: the columns have different lengths {lengths}")
        data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    records = Records(data if isinstance(data, list) else [data], str(path), unit="record")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{records.where(i)}: expected an object with fields, got {_show(record)}")
    return records


def _read_jsonl(path: Path, text: str) -> Records:
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number} column {err.colno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: expected a JSON object with fields, got {_show(record)}")
        rows.append(record)
        lines.append(number)
    return Records(rows, str(path), lines, "line")


def _read_parquet(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path} is not a readable Parquet file ({err})") from err
    return Records(table.to_pylist(), str(path), range(1, table.num_rows + 1), "row")


def _read_hub(name: str, split: str) -> Records:
    hint = f"use a local {'/'.join(SUFFIXES)} file or a built-in data set ({', '.join(BUILTINS)})"
    try:
        import datasets
    except ImportError as err:
        raise DataUnavailableError(f"{name!r} is not a local file, so it was taken for a Hugging Face dataset, "
                                   f"which needs `pip install datasets`; or {hint}") from err
    try:
        rows = datasets.load_dataset(name, split=split).to_list()
    except Exception as err:  # offline, unknown name, unknown split: all end the same way for the user
        raise DataUnavailableError(f"could not load Hugging Face dataset {name!r} (split {split!r}): {err}. "
                                   f"Without access to the Hub, {hint}") from err
    return Records(rows, f"{name} ({split})", unit="row")


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_fields(records: list[dict], fields: dict[str, str], text: tuple[str, ...] = ()) -> None:
    """Every record has every field, and the `text` ones hold strings.

    Args:
        fields: {field name: the setting that names it} ("label": "label_field"), for the message.
        text: the fields whose values must be strings.
    """
    if not records:
        raise DataError(f"{source_of(records)}: no records to build a dataset from")
    for name, setting in fields.items():
        if not any(name in r for r in records):
            raise DataError(f"{source_of(records)} has no field {name!r} (its fields: {', '.join(map(str, records[0]))})"
                            f"; set data.{setting} to the field that holds it")
    for i, record in enumerate(records):
        for name in fields:
            if name not in record:
                raise DataError(f"{where(records, i)}: no field {name!r} (this record has: "
                                f"{', '.join(map(str, record))})")
            if name in text and not isinstance(record[name], str):
                raise DataError(f"{where(records, i)}: field {name!r} must be a string, got {_show(record[name])}")


def _label(value, records: list[dict], i: int, field: str) -> int | str:
    """A class id (int) or a class name (str) from one label value; refuses empty and non-class values."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool | int):
        return int(value)
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where(records, i)}: the label field {field!r} is empty; every example needs a label "
                        "(fill it in or drop the row)")
    if isinstance(value, str):
        value = value.strip()
        return int(value) if _INT.fullmatch(value) else value  # "0"/"1" from a CSV file are ids, not names
    raise DataError(f"{where(records, i)}: label {_show(value)} in field {field!r} is not a class: use integer "
                    "class ids 0..N-1 or class names (regression is not supported)")


def label_ids(records: list[dict], field: str, label_to_id: dict[str, int] | None = None,
              num_labels: int | None = None) -> tuple[list[int], dict[str, int] | None]:
    """Class ids of every record, and {name: id} when the labels are names (ids follow sorted names).

    Args:
        label_to_id: a mapping to reuse (the training set's, for the evaluation sets); every label
            must be one of its names.
        num_labels: the model's classes when known; ids must lie in 0..num_labels-1.

    Raises:
        DataError: an empty or missing label, a mix of ids and names, a negative id, an id or a
            name count beyond `num_labels`, a name outside `label_to_id`; the row is named.
    """
    values = [_label(r.get(field), records, i, field) for i, r in enumerate(records)]
    if label_to_id is not None:
        for i, v in enumerate(values):
            if str(v) not in label_to_id:
                raise DataError(f"{where(records, i)}: label {v!r} is not in the label mapping {label_to_id} "
                                "of the training data")
        return [label_to_id[str(v)] for v in values], label_to_id
    first_id = next((i for i, v in enumerate(values) if isinstance(v, int)), None)
    first_name = next((i for i, v in enumerate(values) if isinstance(v, str)), None)
    if first_id is not None and first_name is not None:
        raise DataError(f"{source_of(records)}: labels mix class ids and names ({where(records, first_id)}: "
                        f"{values[first_id]}, {where(records, first_name)}: {values[first_name]!r}); use one kind")
    if first_name is not None:
        label_to_id = {name: i for i, name in enumerate(sorted(set(values)))}
        if num_labels is not None and len(label_to_id) > num_labels:
            raise DataError(f"{source_of(records)} has {len(label_to_id)} label names {sorted(label_to_id)[:10]}, "
                            f"more than the model's {num_labels} classes; set model.num_labels")
        return [label_to_id[v] for v in values], label_to_id
    for i, v in enumerate(values):
        if v < 0 or (num_labels is not None and v >= num_labels):
            classes = f"0..{num_labels - 1}" if num_labels else "0..N-1"
            raise DataError(f"{where(records, i)}: label {v} in field {field!r} is not one of the model's classes "
                            f"({classes}); fix the row" + ("" if v < 0 else " or set model.num_labels"))
    return values, None
