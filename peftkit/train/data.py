"""Records in, padded batches out: the two dataset kinds and a dynamic-padding collate.

    records = read_records("rotten_tomatoes", split="train")      # or a .csv/.jsonl/.parquet file
    ds = ClassificationDataset(records, tokenizer, max_length=128, n=512)
    loader = DataLoader(ds, batch_size=16, shuffle=True, collate_fn=partial(collate, pad_id=tok.pad_token_id))

A record is a plain dict (`{"text": ..., "label": ...}`; reading and checking them is `records.py`);
datasets hold tokenized examples as dicts of 1-D tensors and `collate` pads each batch to its longest
example, so short reviews stay cheap.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from .records import DataError, check_fields, label_ids, read_records  # noqa: F401  (read_records: public here)

IGNORE_INDEX = -100
"""Label value that cross-entropy skips (padding, prompt tokens)."""


def _subset(items: list, n: int | None, seed: int) -> list:
    """All items in order, or the first n after a shuffle with a fixed seed (same n, same subset)."""
    if n is None:
        return items
    if n < 1:
        raise DataError(f"a subset needs n >= 1, got n={n}")
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:n]


def _check_length(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive number of tokens, got {value!r}")


class ClassificationDataset(Dataset):
    """Tokenized (text, label) examples: `input_ids`, `attention_mask` (1-D) and a 0-d `labels`.

    Attributes:
        labels: the integer label of every example.
        label_to_id: {name: id} when labels were strings (ids follow sorted names), else None.
        num_labels: the `num_labels` given, else the number of classes seen (or in the mapping).
    """

    def __init__(self, records: list[dict], tokenizer, text_field: str = "text", label_field: str = "label",
                 max_length: int = 128, n: int | None = None, seed: int = 0,
                 label_to_id: dict[str, int] | None = None, num_labels: int | None = None) -> None:
        """Check and tokenize the records.

        Args:
            records: dicts with `text_field` (a string) and `label_field` (a class id or a class name);
                `read_records` output lets errors name the file and line.
            tokenizer: a transformers tokenizer.
            max_length: tokens kept per text (longer texts are truncated).
            n: keep only the first n records after a shuffle with `seed`; None keeps all, in order.
            label_to_id: a mapping to reuse (pass the train set's to the validation set).
            num_labels: the model's classes, when known: ids outside 0..num_labels-1 are refused here,
                not mid-training.

        Raises:
            DataError: a missing field, a text that is not a string, an empty or out-of-range label
                (the message names the file, row and field).
        """
        _check_length("max_length", max_length)
        check_fields(records, {text_field: "text_field", label_field: "label_field"}, text=(text_field,))
        # map labels on all records first, so a subset cannot change the ids
        ids, self.label_to_id = label_ids(records, label_field, label_to_id, num_labels)
        pairs = _subset(list(zip([r[text_field] for r in records], ids, strict=True)), n, seed)
        enc = tokenizer([t for t, _ in pairs], truncation=True, max_length=max_length)
        self.input_ids = enc["input_ids"]
        self.labels = [y for _, y in pairs]
        self.num_labels = num_labels or (len(self.label_to_id) if self.label_to_id else max(ids, default=-1) + 1)

    @property
    def label_names(self) -> list[str] | None:
        """Class names in id order when the labels were names (what predictions map back to), else None."""
        return None if self.label_to_id is None else sorted(self.label_to_id, key=self.label_to_id.get)

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
        _check_length("block_size", block_size)
        fields = {text_field: "text_field", **({prompt_field: "prompt_field"} if prompt_field else {})}
        check_fields(records, fields, text=tuple(fields))
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
