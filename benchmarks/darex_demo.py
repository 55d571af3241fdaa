"""DAREx-q vs DARE at drop rates 0.9 and 0.99 on the demo task (a LoRA on MiniLM, Rotten Tomatoes).

Prunes a trained LoRA adapter with `peftkit.combine([adapter], [1.0], how, density=1-p, ...)` and reports
test accuracy (the fixed 2,000-review test split) for

* DARE: rescale 1/(1-p);
* DAREx-q data-free: q per layer in closed form from unlabelled layer inputs (8 batches of 16 training
  reviews, collected on the adapted model);
* DAREx-q validation: one q from a grid, chosen on the 500-review validation split;

in two spaces: the LoRA factors A and B pruned separately (`dare_linear`, peft's convention), and the
delta ΔW = s B A pruned and kept at full rank (`dare_linear_svd` with svd_rank = min(d_out, d_in)).
Every variant of one (p, space, seed) uses the same mask.

    .venv/bin/peftkit train examples/lora_minilm.yaml --train.output_dir /tmp/lora_rt --overwrite
    .venv/bin/python benchmarks/darex_demo.py --adapter /tmp/lora_rt --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

import torch

import peftkit
from peftkit.core.io import read_adapter, write_adapter
from peftkit.merging import combine, tune_q
from peftkit.train.assets import rotten_tomatoes_split
from peftkit.train.data import ClassificationDataset, collate
from peftkit.train.layer_inputs import collect_layer_inputs
from peftkit.train.models import load_model


def batches_of(data, size: int, pad_id: int):
    for i in range(0, len(data), size):
        yield collate([data[j] for j in range(i, min(i + size, len(data)))], pad_id)


@torch.no_grad()
def accuracy(model, data, pad_id: int) -> float:
    correct = 0
    for batch in batches_of(data, 64, pad_id):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(data)


def scorer(model, data, pad_id: int):
    """Accuracy of the base model with an adapter value loaded (written to a temporary directory)."""
    def score(adapter) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            write_adapter(tmp, adapter[0], adapter[2], adapter[1])
            peftkit.load(model, tmp)
        try:
            return accuracy(model.eval(), data, pad_id)
        finally:
            peftkit.unload(model)
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", default="/tmp/lora_rt")
    parser.add_argument("--drop", type=float, nargs="+", default=[0.9, 0.99])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--grid", type=int, default=10, help="q values tried on validation (0: skip that variant)")
    parser.add_argument("--test-size", type=int, default=2000, help="test reviews scored (the first n of the split)")
    parser.add_argument("--out", default="benchmarks/results/darex_demo.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    value = read_adapter(args.adapter)
    model, tok = load_model("minilm", "classification", num_labels=2)
    split = rotten_tomatoes_split()
    split["test"] = split["test"][: args.test_size]
    data = {k: ClassificationDataset([{"text": t, "label": y} for t, y in split[k]], tok, max_length=64)
            for k in ("validation", "test", "train")}
    test, val = scorer(model, data["test"], tok.pad_token_id), scorer(model, data["validation"], tok.pad_token_id)
    names = [k[: -len(".lora_A")] for k in value[2] if k.endswith(".lora_A")]
    peftkit.load(model, args.adapter)
    inputs = collect_layer_inputs(model, ([{k: v for k, v in b.items() if k != "labels"}
                                           for b in batches_of(data["train"], 16, tok.pad_token_id)][:8]), names)
    peftkit.unload(model)
    rows = {"full adapter": test(value), "no adapter (base, trained head)": test(
        combine([value], [0.0], "linear"))}
    print(rows, flush=True)
    for p in args.drop:
        density = 1 - p
        grid = [density * (1 / density) ** (i / max(args.grid - 1, 1)) for i in range(args.grid)]  # density..1
        for how in ("dare_linear", "dare_linear_svd"):
            full = {"svd_rank": max(min(value[2][n + ".lora_B"].shape[0], value[2][n + ".lora_A"].shape[1])
                                    for n in names)} if how.endswith("svd") else {}
            for seed in args.seeds:
                opts = {"density": density, "seed": seed, **full}
                key = f"p={p} {how} seed={seed}"
                rows[f"{key} DARE"] = test(combine([value], [1.0], how, **opts))
                rows[f"{key} DAREx-q data-free"] = test(combine([value], [1.0], how, q="data-free", inputs=inputs,
                                                                **opts))
                if grid:
                    q, best, _ = tune_q([value], [1.0], val, grid, how, **opts)
                    rows[f"{key} DAREx-q validation (q={q:.3g}, 1/q={1 / q:.3g})"] = test(best)
                print({k: v for k, v in rows.items() if k.startswith(key)}, flush=True)
    with open(args.out, "w") as f:
        json.dump({"adapter": args.adapter, "rows": rows}, f, indent=1)
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |")
    assert not any(math.isnan(v) for v in rows.values())


if __name__ == "__main__":
    main()
