"""Choose a demo method's learning rate on the validation split (never on test).

Runs the text demo's budget for one method at several learning rates, scoring each on the 500
validation snippets, and prints a line to paste next to `TEXT_METHODS` in peftkit/train/demo.py:

    .venv/bin/python benchmarks/sweep_lr.py svfit 1e-3 3e-3 1e-2
    .venv/bin/python benchmarks/sweep_lr.py adalora 1e-3 2e-3 --adapter '{"init_r": 12, "target_r": 8}'

Each run is `peftkit train` in a subprocess with the demo's run config, except that the "test" split
is the validation split (`data.test_split=validation`, all 500 snippets).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftkit.train.demo import TEXT_BUDGET, TEXT_METHODS, _run_one, run_config


def sweep(method: str, lrs: list[float], fields: dict, out: Path) -> dict[float, float]:
    """Validation accuracy per learning rate."""
    scores = {}
    for lr in lrs:
        cfg = run_config("text", method, fields, lr, TEXT_BUDGET, out / f"lr{lr:g}")
        cfg["data"].update(test_split="validation", test_size=None)
        scores[lr] = _run_one(cfg, quiet=True)["test_accuracy"]
        print(f"{method} lr {lr:g}: validation accuracy {scores[lr]:.4f}", flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method")
    parser.add_argument("lrs", nargs="+", type=float)
    parser.add_argument("--adapter", default=None, help="adapter fields as JSON (default: the demo's)")
    parser.add_argument("--out", default="runs/sweep")
    args = parser.parse_args()
    fields = json.loads(args.adapter) if args.adapter else TEXT_METHODS.get(args.method, ({}, 0))[0]
    scores = sweep(args.method, args.lrs, fields, Path(args.out) / args.method)
    print(f"# {args.method} " + " / ".join(f"{lr:g}" for lr in scores) + " -> "
          + " / ".join(f"{s:.3f}" for s in scores.values()))


if __name__ == "__main__":
    main()
