"""Records in, padded batches out: readers, the two dataset kinds and a dynamic-padding collate.

    records = read_records("rotten_tomatoes", split="train")      # or a .csv/.jsonl/.parquet file
    ds = ClassificationDataset(records, tokenizer, max_length=128, n=512)
    loader = DataLoader(ds, batch_size=16, shuffle=True, collate_fn=partial(collate, pad_id=tok.pad_token_id))

A record is a plain dict (`{"text": ..., "label": ...}`); datasets hold tokenized examples as dicts
of 1-D tensors and `collate` pads each batch to its longest example, so short reviews stay cheap.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from . import assets

IGNORE_INDEX = -100
"""Label value that cross-entropy skips (padding, prompt tokens)."""
BUILTINS = ("rotten_tomatoes", "shakespeare")
SPLITS = ("train", "validation", "test")


def read_records(source: str, split: str | None = None) -> list[dict]:
    """Records from a local file, a built-in offline data set, or a Hugging Face dataset.

    Args:
        source: a `.csv`, `.jsonl`, `.json` or `.parquet` file; "rotten_tomatoes" (fields `text`,
            `label`: 1 fresh, 0 rotten; see `assets.rotten_tomatoes_split`); "shakespeare" (fields
            `text`, `work`, one record per work; see `assets.shakespeare_split`); otherwise a dataset
            name for `datasets.load_dataset`, which needs the network and the `datasets` package.
        split: "train", "validation" or "test" for the built-ins (default "train"), any split name
            for a Hugging Face dataset; a local file is one split, so it is ignored there.

    Raises:
        ValueError: an unknown split of a built-in.
        FileNotFoundError: a file path that does not exist.
        RuntimeError: a Hugging Face dataset that could not be loaded.
    """
    if source in BUILTINS:
        return _read_builtin(source, split or "train")
    path = Path(source).expanduser()
    if path.suffix.lower() in (".csv", ".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"no data file at {path}")
        return _read_file(path)
    return _read_hub(source, split or "train")


def _read_builtin(name: str, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"{name} has splits {', '.join(SPLITS)}; got split={split!r}")
    if name == "rotten_tomatoes":
        return [{"text": t, "label": y} for t, y in assets.rotten_tomatoes_split()[split]]
    return [{"text": text, "work": work} for work, text in assets.shakespeare_split()[split]]


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return [dict(row) for row in csv.DictReader(f)]  # values are strings; datasets coerce labels
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from err
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # a .json file that holds JSON lines
        if isinstance(data, list):
            return data
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            # columns: {"text": [...], "label": [...]}
            return [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
        if isinstance(data, dict):
            return [data]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_hub(name: str, split: str) -> list[dict]:
    hint = (f"use a local .csv/.jsonl/.json/.parquet file or a built-in data set ({', '.join(BUILTINS)})")
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(f"{name!r} is not a local file, so it was taken for a Hugging Face dataset, "
                           f"which needs `pip install datasets`; or {hint}") from err
    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as err:  # offline, unknown name, unknown split: all end the same way for the user
        raise RuntimeError(f"could not load Hugging Face dataset {name!r} (split {split!r}): {err}. "
                           f"Without access to the Hub, {hint}") from err


def _subset(items: list, n: int | None, seed: int) -> list:
    """All items in order, or the first n after a shuffle with a fixed seed (same n, same subset)."""
    if n is None:
        return items
    if n < 1:
        raise ValueError(f"a subset needs n >= 1, got n={n}")
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:n]


def _label_ids(values: list, label_to_id: dict | None) -> tuple[list[int], dict | None]:
    """Integer labels, and the mapping used for non-integer values (None when they were integers)."""
    def as_int(v):
        if isinstance(v, bool | int):
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)  # "0"/"1" from a CSV file are integers, not names
        return None

    if label_to_id is None:
        ints = [as_int(v) for v in values]
        if all(i is not None for i in ints):
            return ints, None
        label_to_id = {v: i for i, v in enumerate(sorted({str(v) for v in values}))}
    missing = sorted({str(v) for v in values} - set(label_to_id))
    if missing:
        raise ValueError(f"labels {missing[:5]} are not in the label mapping {label_to_id}")
    return [label_to_id[str(v)] for v in values], label_to_id


class ClassificationDataset(Dataset):
    """Tokenized (text, label) examples: `input_ids`, `attention_mask` (1-D) and a 0-d `labels`.

    Attributes:
        labels: the integer label of every example.
        label_to_id: {name: id} when labels were strings (ids follow sorted names), else None.
        num_labels: the number of classes seen (or in the mapping).
    """

    def __init__(self, records: list[dict], tokenizer, text_field: str = "text", label_field: str = "label",
                 max_length: int = 128, n: int | None = None, seed: int = 0,
                 label_to_id: dict[str, int] | None = None) -> None:
        """Tokenize the records.

        Args:
            records: dicts with `text_field` and `label_field`.
            tokenizer: a transformers tokenizer.
            max_length: tokens kept per text (longer texts are truncated).
            n: keep only the first n records after a shuffle with `seed`; None keeps all, in order.
            label_to_id: a mapping to reuse (pass the train set's to the validation set).
        """
        _check_fields(records, (text_field, label_field))
        # map labels on all records first, so a subset cannot change the ids
        ids, self.label_to_id = _label_ids([r[label_field] for r in records], label_to_id)
        pairs = _subset(list(zip([r[text_field] for r in records], ids, strict=True)), n, seed)
        enc = tokenizer([t for t, _ in pairs], truncation=True, max_length=max_length)
        self.input_ids = enc["input_ids"]
        self.labels = [y for _, y in pairs]
        self.num_labels = len(self.label_to_id) if self.label_to_id else max(ids, default=-1) + 1

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.input_ids[i], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor(self.labels[i], dtype=torch.long)}


class CausalLMDataset(Dataset):
    """Next-token examples: `input_ids`, `attention_mask` and `labels` (1-D), labels shifted by the model.

    Two modes:

    * "blocks" (pretraining style): all texts are tokenized, joined with the EOS token and cut into
      blocks of exactly `block_size` tokens (the remainder is dropped); `labels = input_ids`.
    * "records" (instruction style): each record is one example of at most `block_size` tokens ending
      with EOS. With `prompt_field`, the example is prompt + text and the prompt's labels are -100,
      so only the answer is learned; a prompt that does not fit loses its first tokens.
    """

    def __init__(self, records: list[dict], tokenizer, text_field: str = "text", block_size: int = 128,
                 mode: str = "blocks", prompt_field: str | None = None, n: int | None = None,
                 seed: int = 0) -> None:
        """Tokenize the records.

        Args:
            records: dicts with `text_field` (and `prompt_field` if given).
            tokenizer: a transformers tokenizer with an EOS token.
            block_size: tokens per block ("blocks") or at most per example ("records").
            mode: "blocks" or "records".
            prompt_field: records mode only: the field holding the prompt (labels -100).
            n: keep the first n blocks / records after a shuffle with `seed`; None keeps all, in order.
        """
        if mode not in ("blocks", "records"):
            raise ValueError(f"mode must be 'blocks' or 'records', got {mode!r}")
        if prompt_field is not None and mode != "records":
            raise ValueError("prompt_field needs mode='records' (blocks run across record boundaries)")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no eos_token; set one before building the dataset")
        _check_fields(records, (text_field,) if prompt_field is None else (text_field, prompt_field))
        if mode == "blocks":
            self.examples = _subset(_blocks(records, tokenizer, text_field, block_size), n, seed)
        else:
            records = _subset(records, n, seed)  # before tokenizing: a small n stays cheap
            self.examples = [_record_example(r, tokenizer, text_field, prompt_field, block_size) for r in records]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.examples[i]
        ids = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor(labels, dtype=torch.long)}


def _blocks(records: list[dict], tokenizer, field: str, block_size: int) -> list[tuple[list, list]]:
    # verbose=False: whole works are far longer than model_max_length, which is expected here
    enc = tokenizer([r[field] for r in records], add_special_tokens=False, verbose=False)["input_ids"]
    stream = [tok for ids in enc for tok in (*ids, tokenizer.eos_token_id)]
    starts = range(0, len(stream) - block_size + 1, block_size)
    return [(stream[s:s + block_size], stream[s:s + block_size]) for s in starts]


def _record_example(record: dict, tokenizer, field: str, prompt_field: str | None,
                    block_size: int) -> tuple[list, list]:
    answer = tokenizer(record[field], add_special_tokens=False)["input_ids"][: block_size - 1]
    answer = [*answer, tokenizer.eos_token_id]
    prompt = []
    if prompt_field is not None:
        prompt = tokenizer(record[prompt_field], add_special_tokens=False)["input_ids"]
        # keep the prompt's end: it is next to the answer and usually holds the question
        prompt = prompt[max(len(prompt) - (block_size - len(answer)), 0):]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def _check_fields(records: list[dict], fields: tuple[str, ...]) -> None:
    if not records:
        raise ValueError("no records to build a dataset from")
    missing = [f for f in fields if f not in records[0]]
    if missing:
        raise KeyError(f"records have no field {missing}; their fields are {sorted(records[0])}")


def collate(batch: list[dict[str, torch.Tensor]], pad_id: int, padding_side: str = "right") -> dict:
    """Stack examples, padding 1-D tensors to the longest in the batch.

    `input_ids` pad with `pad_id`, `labels` with -100 (so padding adds no loss), everything else
    (attention_mask, token_type_ids) with 0. 0-d tensors such as class labels are stacked.

    Args:
        batch: examples from one of the datasets above.
        pad_id: the tokenizer's pad token id.
        padding_side: "right" for training, "left" for batched generation.
    """
    if pad_id is None:
        raise ValueError("pad_id is None; give the tokenizer a pad token (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    out = {}
    for key in batch[0]:
        values = [ex[key] for ex in batch]
        if values[0].dim() == 0:
            out[key] = torch.stack(values)
            continue
        fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        longest = max(v.shape[0] for v in values)
        padded = torch.full((len(values), longest), fill, dtype=values[0].dtype)
        for row, v in zip(padded, values, strict=True):
            if padding_side == "left":
                row[longest - len(v):] = v
            else:
                row[: len(v)] = v
        out[key] = padded
    return out
