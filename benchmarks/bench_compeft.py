"""ComPEFT on the text demo: compression ratio and accuracy at densities 5/10/20%, best alpha per density.

Train the adapter once, then run this script on it:

    .venv/bin/peftkit train examples/lora_minilm.yaml --train.output_dir /tmp/lora_rt_compeft --overwrite
    .venv/bin/python benchmarks/bench_compeft.py --run /tmp/lora_rt_compeft
    .venv/bin/python benchmarks/bench_compeft.py --run /tmp/lora_rt_compeft --alphas 0.5,1,2,4,8,12,16,24,32 \
        --threads 1 --out benchmarks/results/compeft-wide-alpha.json

For each density and each alpha of the grid the adapter is compressed, written in the compact format,
read back through `peftkit.load_weights` (the decoding path of `peftkit.load`) and evaluated on the
validation split; the alpha with the best validation accuracy is then evaluated on the test split
(the paper tunes alpha on a small validation set). Variants (`--variants`): every tensor compressed,
the task head (`classifier`, trained from a random init) kept dense, ... Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import peftkit
from peftkit.core.io import WEIGHTS_FILE, read_adapter, write_adapter
from peftkit.merging.compeft import compress, compression_ratio
from peftkit.train.distributed import Dist
from peftkit.train.evaluation import evaluate
from peftkit.train.run import _model_and_data
from peftkit.train.run_config import load_run_config


def evaluate_split(model, data, collate_fn, cfg) -> float:
    return evaluate(model, data, collate_fn, cfg.train, Dist(0, 1, next(model.parameters()).device, False))["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="/tmp/lora_rt_compeft", help="output_dir of the training run")
    parser.add_argument("--config", default="examples/lora_minilm.yaml")
    parser.add_argument("--densities", default="0.05,0.1,0.2")
    parser.add_argument("--alphas", default="0.5,1,2,4,8", help="','-separated alpha grid")
    parser.add_argument("--variants", default=";classifier",
                        help="';'-separated variants, each a ','-separated list of key substrings kept dense")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="", help="also write the JSON (rows and every val acc) to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # shared machine: leave the other cores to other jobs
    cfg = load_run_config(args.config, [])
    model, data, collate_fn = _model_and_data(cfg)
    adapter_dir = Path(args.run) / "adapter"
    peftkit.load(model, adapter_dir)
    dense = read_adapter(adapter_dir)
    dense_bytes = (adapter_dir / WEIGHTS_FILE).stat().st_size
    rows = [("uncompressed", "-", "-", 1.0, 1.0, evaluate_split(model, data["eval"], collate_fn, cfg),
             evaluate_split(model, data["test"], collate_fn, cfg))]
    print(rows[0])
    grid = []  # every (variant, density, alpha, val acc), to see where the best alpha sits in the grid
    with tempfile.TemporaryDirectory() as tmp:
        for exclude in (tuple(v for v in variant.split(",") if v) for variant in args.variants.split(";")):
            for density in (float(d) for d in args.densities.split(",")):
                best = None
                for alpha in (float(a) for a in args.alphas.split(",")):
                    config, meta, tensors = compress(dense, density=density, alpha=alpha, exclude=exclude)
                    out = Path(tmp, f"{density}-{alpha}-{len(exclude)}")
                    write_adapter(out, config, tensors, meta)
                    peftkit.load_weights(model, out)  # decodes the packed file
                    val = evaluate_split(model, data["eval"], collate_fn, cfg)
                    print(f"exclude={exclude} density={density} alpha={alpha}: val {val:.4f}", flush=True)
                    grid.append((",".join(exclude), density, alpha, val))
                    if best is None or val > best[0]:
                        bits = compression_ratio(dense[2], tensors, meta["pack_ternary"])
                        best = (val, alpha, out, dense_bytes / (out / WEIGHTS_FILE).stat().st_size, bits)
                val, alpha, out, on_disk, bits = best
                peftkit.load_weights(model, out)
                test = evaluate_split(model, data["test"], collate_fn, cfg)
                rows.append(("all tensors" if not exclude else "dense: " + ", ".join(exclude), density, alpha, on_disk, bits, val, test))
                print(rows[-1], flush=True)
    print("\n| compressed | density | best alpha | ratio on disk | ratio (bits) | val acc | test acc |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, density, alpha, on_disk, bits, val, test in rows:
        print(f"| {name} | {density} | {alpha} | {on_disk:.1f}x | {bits:.1f}x | {val:.3f} | {test:.3f} |")
    result = json.dumps({"when": time.strftime("%Y-%m-%d"), "alphas": args.alphas, "rows": rows, "grid": grid})
    print(result)
    if args.out:
        Path(args.out).write_text(result + "\n")


if __name__ == "__main__":
    main()
