"""Choose a demo method's learning rate on the validation split (never on test).

Runs a demo's budget for one method at several learning rates, scoring each on the validation split
(text: 500 snippets; vision: 500 MNIST-5k images), and prints a line to paste next to the method's
row (`TEXT_METHODS` / `VISION_METHODS` in peftkit/train/demo.py):

    .venv/bin/python benchmarks/sweep_lr.py svfit 1e-3 3e-3 1e-2
    .venv/bin/python benchmarks/sweep_lr.py adalora 1e-3 2e-3 --adapter '{"init_r": 12, "target_r": 8}'
    .venv/bin/python benchmarks/sweep_lr.py ssf 1e-2 3e-2 --task vision

Each run is `peftkit train` in a subprocess with the demo's run config, except that the "test" split
is the validation split (`data.test_split=validation`, all of it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftkit.train.demo import TEXT_BUDGET, VISION_BUDGET, _run_one, demo_methods, run_config


def sweep(method: str, lrs: list[float], fields: dict, out: Path, task: str = "text") -> dict[float, float]:
    """Validation accuracy per learning rate."""
    scores = {}
    budget = TEXT_BUDGET if task == "text" else VISION_BUDGET
    for lr in lrs:
        cfg = run_config(task, method, fields, lr, budget, out / f"lr{lr:g}")
        cfg["data"].update(test_split="validation", test_size=None)
        scores[lr] = _run_one(cfg, quiet=True)["test_accuracy"]
        print(f"{method} lr {lr:g}: validation accuracy {scores[lr]:.4f}", flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method")
    parser.add_argument("lrs", nargs="+", type=float)
    parser.add_argument("--adapter", default=None, help="adapter fields as JSON (default: the demo's)")
    parser.add_argument("--task", choices=["text", "vision"], default="text")
    parser.add_argument("--out", default="runs/sweep")
    args = parser.parse_args()
    fields = json.loads(args.adapter) if args.adapter else demo_methods(args.task).get(args.method, ({}, 0))[0]
    scores = sweep(args.method, args.lrs, fields, Path(args.out) / args.task / args.method, args.task)
    print(f"# {args.method} " + " / ".join(f"{lr:g}" for lr in scores) + " -> "
          + " / ".join(f"{s:.3f}" for s in scores.values()))


if __name__ == "__main__":
    main()
