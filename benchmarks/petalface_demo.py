"""PETALface as a vision-demo row: two LoRAs mixed per image by a known quality score, vs single LoRAs.

The vision demo's task (the project's ViT pretrained on Fashion-MNIST, adapted to MNIST-5k: 1,000
train / 3,500 test images) with half of the train images and half of the test images blurred
(peftkit/train/petalface.py: sigma = level * 2.5 px, level uniform in [0.5, 1], alpha = 1 - level;
sharp images have alpha = 1). Every trained row has the demo's LoRA budget: r 8, alpha 16 on qkv,
attn.proj, fc1, fc2, a fresh shared head, lr 1e-2, `--steps` steps of batch 64 (the demo's 300), 10%
warm-up then linear decay. Rows, all tested on the same blurred/sharp test mix:

* one LoRA: r 8 (and r 16, as many trainable parameters as PETALface's two r 8) on all train images;
* PETALface: LoRA_low + LoRA_high trained jointly with per-sample alpha, tested with per-sample
  alpha; the same trained model tested with alpha = 0 (LoRA_low alone), 1 (LoRA_high alone) and 0.5
  for every image (the two mixed without the quality score);
* separate LoRAs: r 8 trained on the blurred (sharp) train images only, same steps; and both routed by
  the known quality (the blurred-only model on blurred test images, the sharp-only one on sharp).

    .venv/bin/python benchmarks/petalface_demo.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Subset

from peftkit.train import petalface as pf

ONE = partial(pf.mixture_collate, names=None)  # batches for a model with one adapter


GROUPS = ("r8", "r16", "petalface", "separate")
"""Row groups, each trained on its own (`--rows`, `--lr-of`)."""


def scorer(test, validation=None):
    """`(model, collate) -> figures` on `test`, with the validation figures under "validation" when given."""
    def score(model, collate) -> dict:
        figures = pf.evaluate_quality(model, test, collate)
        if validation is not None:
            figures["validation"] = pf.evaluate_quality(model, validation, collate)
        return figures
    return score


def run_seed(seed: int, train, score, steps: int, batch: int, lrs: dict[str, float],
             groups: tuple[str, ...] = GROUPS) -> dict[str, dict]:
    """Every row's figures (`score`) and training time for one training seed; `lrs`: learning rate per group."""
    rows: dict[str, dict] = {}
    fit = partial(pf.train_adapters, steps=steps, batch_size=batch, seed=seed)
    for r in (8, 16):
        if f"r{r}" in groups:
            model = pf.build_model(two_loras=False, r=r, lora_alpha=2.0 * r, seed=seed)
            trained = fit(model, train, ONE, lr=lrs[f"r{r}"])
            rows[f"one LoRA r{r}, all images"] = {**trained, **score(model, ONE)}
    if "petalface" in groups:
        model = pf.build_model(two_loras=True, seed=seed)
        trained = fit(model, train, pf.mixture_collate, lr=lrs["petalface"])
        for label, alpha in (("PETALface, per-image alpha", None),
                             ("PETALface model, LoRA_low alone (alpha 0)", 0.0),
                             ("PETALface model, LoRA_high alone (alpha 1)", 1.0),
                             ("PETALface model, alpha 0.5 for all", 0.5)):
            started = time.perf_counter()
            figures = score(model, partial(pf.mixture_collate, alpha=alpha))
            rows[label] = {**trained, **figures, "test_time_s": time.perf_counter() - started}
    if "separate" in groups:
        rows.update(separate_loras(fit, train, score, lrs["separate"], seed))
    return rows


def separate_loras(fit, train, score, lr: float, seed: int) -> dict[str, dict]:
    """LoRA r8 trained on the blurred (sharp) train images only, and the two routed by the known quality."""
    rows = {}
    for part, mask in (("blurred", train.blurred), ("sharp", ~train.blurred)):
        model = pf.build_model(two_loras=False, seed=seed)
        trained = fit(model, Subset(train, mask.nonzero().flatten().tolist()), ONE, lr=lr)
        rows[f"LoRA r8 on {part} train images only"] = {**trained, **score(model, ONE)}
    low, high = rows["LoRA r8 on blurred train images only"], rows["LoRA r8 on sharp train images only"]
    n_b, n_s = low["n_blurred"], low["n_sharp"]
    rows["two separate LoRAs, routed by quality"] = {
        "accuracy": (low["accuracy_blurred"] * n_b + high["accuracy_sharp"] * n_s) / (n_b + n_s),
        "accuracy_sharp": high["accuracy_sharp"], "accuracy_blurred": low["accuracy_blurred"],
        "time_s": low["time_s"] + high["time_s"],
        "trainable_params": low["trainable_params"] + high["trainable_params"]}
    return rows


def table(per_seed: list[dict[str, dict]]) -> str:
    """Markdown: mean (and std over seeds when several) of each row's accuracies, params, train time."""
    def cell(name: str, key: str) -> str:
        values = [rows[name][key] for rows in per_seed]
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    lines = ["| row | accuracy (all) | sharp half | blurred half | trainable params | train time (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in per_seed[0]:
        time_s = statistics.mean(rows[name]["time_s"] for rows in per_seed)
        lines.append(f"| {name} | {cell(name, 'accuracy')} | {cell(name, 'accuracy_sharp')} | "
                     f"{cell(name, 'accuracy_blurred')} | {per_seed[0][name]['trainable_params']:,} | {time_s:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate of every row group")
    parser.add_argument("--lr-of", nargs="*", default=[], metavar="GROUP=LR",
                        help=f"per-group learning rates, groups {', '.join(GROUPS)}")
    parser.add_argument("--rows", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--split", default="test", choices=["test", "validation"],
                        help="the split of the table: the 3,500 test images or the 500 validation images")
    parser.add_argument("--also-validation", action="store_true",
                        help="score every trained model on validation too (in the JSON), to choose lrs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/petalface.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lrs = {group: args.lr for group in GROUPS} | {k: float(v) for k, v in (kv.split("=") for kv in args.lr_of)}
    train = pf.quality_split("train", seed=0)  # which images are blurred, and how much, is fixed across seeds
    blur_seed = {"test": 1, "validation": 2}
    evaluated = pf.quality_split(args.split, seed=blur_seed[args.split])
    score = scorer(evaluated, pf.quality_split("validation", seed=2) if args.also_validation else None)
    per_seed = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        per_seed.append(run_seed(seed, train, score, args.steps, args.batch_size, lrs, tuple(args.rows)))
        text = table(per_seed)
        print("\n" + text, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": vars(args), "lrs": lrs, "sigma_max": pf.SIGMA_MAX,
                                              "rows": per_seed, "table": text}, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
