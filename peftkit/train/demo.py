"""`peftkit demo`: several methods, one task, the same budget, fully offline.

* `--task text` (default): all-MiniLM-L6-v2 (mean-pooling classifier) on Rotten Tomatoes snippets
  (Pang & Lee 2005; the fixed split of `assets.rotten_tomatoes_split`: 10,252 train / 500
  validation / 2,000 test). Every method trains `TEXT_BUDGET["steps"]` steps of batch 16 on the same
  seeded subset and is tested on the whole 2,000-snippet test split. Reference points: the majority
  class scores 0.594 on test; frozen MiniLM embeddings + logistic regression 0.758 (assets.md).
* `--task lm`: SmolLM2-135M on Shakespeare (train on 40 works, test on The Tempest), held-out loss
  before and after a short budget.
* `--task vision`: the project's ViT pretrained on Fashion-MNIST (`vision.py`, `vit-fmnist`) adapted
  to handwritten digits, MNIST-5k (`images.py`: 1,000 train / 500 validation / 3,500 test). Every
  method trains `VISION_BUDGET["steps"]` steps of batch 64 (19 epochs) over the 1,000 training
  images and is tested on all 3,500 test images. The methods are `VISION_METHODS`, one line each.
  Reference points: logistic regression on the training images' pixels scores 0.881 on test (C
  chosen on validation); the same ViT from a random init, fully fine-tuned with the same budget,
  0.689 (lr 2e-3, as the full row); the majority class 0.103.

Each method runs in its own subprocess (`peftkit train <its run.yaml>`), so the peak memory column
is that method's alone and every row can be re-run by hand from the YAML the demo writes. The
learning rates differ per method (a head or a soft prompt needs a far larger step than full
fine-tuning); everything else is the same budget. Results: a table on stdout, results.md,
results.json and tradeoff.png in the output directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .plots import plot_tradeoff

# method -> (adapter fields, learning rate). Learning rates were chosen on the validation split (500
# snippets, same budget), never on test: full 5e-5/1e-4/2e-4 -> 0.788/0.810/0.800; LoRA 5e-4/1e-3/2e-3
# -> 0.780/0.796/0.800; DoRA 1e-3 -> 0.798; (IA)3 1e-2/3e-2 -> 0.792/0.800; prompt tuning 3e-2/1e-1
# -> 0.726/0.742; head-only 5e-3/2e-2 -> 0.750/0.744.
TEXT_METHODS: dict[str, tuple[dict, float]] = {
    "head-only": ({}, 5e-3),
    "full": ({}, 1e-4),
    "lora": ({"r": 8, "alpha": 16}, 2e-3),
    "dora": ({"r": 8, "alpha": 16}, 1e-3),
    "ia3": ({}, 3e-2),
    "prompt-tuning": ({"num_virtual_tokens": 20}, 1e-1),
    # weight-update methods. Swept on validation with benchmarks/sweep_lr.py (lr -> validation accuracy):
    # SVFit 2e-3/1e-2 -> 0.732/0.764; AdaLoRA 2e-3/5e-3/1e-2 -> 0.758/0.772/0.782; IncreLoRA 2e-3/1e-2 ->
    # 0.774/0.772; TriAdaptLoRA 2e-3/1e-2 -> 0.778/0.784; PEGO 2e-3/1e-2 -> 0.762/0.772. Not swept (time):
    # Hydra and DSEE use LoRA's validated 2e-3; Bone and RandLoRA 3e-4, DiffuseKronA 1e-2 and LoLDU 1e-1
    # from the size of one Adam step's change of the weight relative to LoRA's (benchmarks/NOTES.md).
    "adalora": ({"init_r": 12, "target_r": 8, "alpha": 16, "tinit": 15, "tfinal": 30, "delta_t": 5}, 1e-2),
    "increlora": ({"target_rank": 8, "top_h": 6, "init_warmup": 10, "incre_interval": 10}, 2e-3),
    "triadaptlora": ({"target_rank": 8, "init_warmup": 10, "incre_interval": 10}, 1e-2),
    "svfit": ({}, 1e-2),
    "loldu": ({}, 1e-1),
    "randlora": ({"r": 32}, 3e-4),
    "bone": ({"r": 64}, 3e-4),
    "hydra": ({"r": 8}, 2e-3),
    "diffusekrona": ({}, 1e-2),
    "dsee": ({"r": 8, "alpha": 16, "num_sparse": 64}, 2e-3),
    "pego": ({"r": 2, "num_modules": 4, "alpha": 4}, 1e-2),
    # additive, prompt and selective methods (issue 4). Not swept on validation (machine time): lrs from
    # the papers (LoFiT 1e-2, DePT's prompt 1e-1) or the nearest swept method (adapter as LoRA's step,
    # prefix between prompt tuning and LoRA, BitFit/LN tuning/SSF/DiffFit 1e-2 between LoRA's and (IA)3's, SpIEL/SPT
    # 10x full fine-tuning's as their papers do); README reports them as such.
    "adapter": ({"kind": "houlsby", "bottleneck": 16}, 3e-3),
    "prefix-tuning": ({"num_virtual_tokens": 20}, 3e-2),
    "p-tuning": ({"num_virtual_tokens": 20}, 1e-3),
    "dept": ({"num_virtual_tokens": 10, "r": 8, "max_length": 64, "embedding_lr": 1e-3}, 1e-1),
    "bitfit": ({}, 1e-2),
    "ln-tuning": ({}, 1e-2),
    "ssf": ({}, 1e-2),
    "difffit": ({}, 1e-2),
    "lofit": ({"top_k": 16, "select_steps": 50}, 1e-2),
    "spiel": ({"density": 0.01}, 1e-3),
    "spt": ({"budget": 100_000}, 1e-3),
}
TEXT_DEFAULT = ["head-only", "full", "lora", "dora", "ia3", "prompt-tuning", "svfit"]
"""What `peftkit demo` runs (about 10-15 minutes on 2 cores); `--methods all` runs every row above."""
TEXT_REFERENCES = {"frozen MiniLM embeddings + logistic regression (0.758)": 0.758,
                   "majority class (0.594)": 0.594}
TEXT_BUDGET = {"steps": 150, "batch_size": 16, "max_length": 64, "test_size": None}
LM_METHODS: dict[str, tuple[dict, float]] = {
    "lora": ({"r": 16, "alpha": 32}, 1e-3),
    "dora": ({"r": 16, "alpha": 32}, 1e-3),
    "ia3": ({}, 1e-2),
    "prompt-tuning": ({"num_virtual_tokens": 20}, 1e-2),
    # not swept (the LM demo has no validation split): the papers' lrs, LLaMA-Adapter's 9e-3 rounded
    "llama-adapter": ({"adapter_len": 10}, 1e-2),
    "prefix-tuning": ({"num_virtual_tokens": 20}, 1e-2),
    "p-tuning": ({"num_virtual_tokens": 20}, 1e-3),
}
LM_BUDGET = {"steps": 30, "batch_size": 4, "max_length": 128, "test_size": 24}
VIT_LINEAR = ["qkv", "attn.proj", "fc1", "fc2"]
"""The ViT's linear layers. `attn.proj`, not `proj`: that suffix also matches the patch embedding."""
# One line per method: (method, adapter fields, learning rate). Learning rates were chosen on the
# validation split (500 images, same budget), never on test: full 5e-4/1e-3/2e-3/4e-3 ->
# 0.806/0.844/0.856/0.842; LoRA 3e-3/1e-2/2e-2 -> 0.802/0.816/0.306; head-only 3e-2/1e-1/3e-1 ->
# 0.588/0.630/0.642.
VISION_METHODS: list[tuple[str, dict, float]] = [
    ("head-only", {}, 3e-1),
    ("full", {}, 2e-3),
    ("lora", {"r": 8, "alpha": 16, "targets": VIT_LINEAR}, 1e-2),
    ("vqt", {"num_queries": 5}, 3e-2),  # val 3e-3/1e-2/3e-2/1e-1: .686/.734/.750/.708
    ("ssf", {}, 3e-2),  # val 3e-3/1e-2/3e-2/1e-1: .650/.718/.746/.698
    ("difffit", {}, 3e-2),  # val 1e-2/3e-2/1e-1: .690/.726/.608
    ("bitfit", {}, 3e-2),  # val 1e-2/3e-2/1e-1: .640/.676/.552
    ("spt", {"budget": 10_000}, 3e-2),  # val 3e-3/1e-2/3e-2/1e-1: .678/.732/.788/.222 (diverged)
]
VISION_MODEL = "vit-fmnist"
VISION_REFERENCES = {"logistic regression on the 1,000 training images' pixels (0.881)": 0.881,
                     "the same ViT from a random init, full fine-tuning (0.689)": 0.689,
                     "majority class (0.103)": 0.103}
VISION_BUDGET = {"steps": 300, "batch_size": 64, "test_size": None}
QUICK = {"steps": 3, "batch_size": 4, "max_length": 32, "test_size": 16}


def demo_methods(task: str) -> dict[str, tuple[dict, float]]:
    """{method: (adapter fields, learning rate)} of a demo task, in table order."""
    if task == "vision":
        return {name: (fields, lr) for name, fields, lr in VISION_METHODS}
    return TEXT_METHODS if task == "text" else LM_METHODS


def run_config(task: str, method: str, fields: dict, lr: float, budget: dict, out: Path) -> dict:
    """The YAML-able run config of one demo row."""
    steps, batch = budget["steps"], budget["batch_size"]
    if task == "text":
        model = {"name": "minilm", "task": "classification"}
        data = {"dataset": "rotten_tomatoes", "max_length": budget["max_length"], "train_size": steps * batch,
                "test_size": budget["test_size"], "eval_size": 64}
    elif task == "vision":  # all 1,000 training images, several epochs; quick runs evaluate a few images
        model = {"name": VISION_MODEL, "task": "image-classification"}
        data = {"dataset": "mnist_5k", "test_size": budget["test_size"], "eval_size": budget["test_size"]}
    else:
        model = {"name": "smollm2", "task": "causal-lm"}
        data = {"dataset": "shakespeare", "max_length": budget["max_length"], "train_size": steps * batch,
                "eval_size": budget["test_size"], "test_size": budget["test_size"], "test_before_training": True}
    eval_batch = {"text": 64, "vision": 500}.get(task, 8)  # LM logits are (batch, seq, 49k): keep them small
    train = {"lr": lr, "max_steps": steps, "batch_size": batch, "eval_batch_size": eval_batch, "warmup_ratio": 0.1,
             "output_dir": str(out / method), "log_every": 0, "save_adapter": True, "seed": 0,
             "overwrite": True}  # a demo row is re-run from scratch: its directory holds the last run's files
    return {"model": model, "data": data, "method": method, "adapter": fields, "train": train}


def _run_one(cfg: dict, quiet: bool) -> dict:
    out = Path(cfg["train"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "peftkit", "train", str(out / "run.yaml")]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or "")[-2000:] if quiet else ""
        raise RuntimeError(f"demo row {cfg['method']} failed (exit {proc.returncode}): {' '.join(cmd)}\n{detail}")
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    return {"method": cfg["method"], "trainable_params": final["trainable_params"],
            "trainable_share": final["trainable_share"], "train_time_s": final["time_s"],
            "wall_s": time.perf_counter() - started, "peak_rss_mb": final["peak_rss_mb"],
            **{f"test_{k}": v for k, v in metrics.get("test", {}).items()},
            **{f"before_{k}": v for k, v in metrics.get("test_before", {}).items()}}


def format_table(rows: list[dict], task: str) -> str:
    """Markdown table of the demo's rows."""
    metric = "held-out loss before -> after" if task == "lm" else "test accuracy"
    lines = [f"| method | {metric} | trainable params | share | train time (s) | peak RSS (MB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        value = (f"{r['test_accuracy']:.4f}" if task != "lm"
                 else f"{r.get('before_loss', float('nan')):.3f} -> {r['test_loss']:.3f}")
        lines.append(f"| {r['method']} | {value} | {r['trainable_params']:,} | {100 * r['trainable_share']:.3f}% "
                     f"| {r['train_time_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def run_demo(task: str = "text", methods: list[str] | None = None, quick: bool = False,
             output_dir: str | os.PathLike = "runs/demo", steps: int | None = None) -> list[dict]:
    """Fine-tune each method with the same budget, then print and write the comparison."""
    table = demo_methods(task)
    if methods == ["all"]:
        methods = list(table)
    methods = methods or (TEXT_DEFAULT if task == "text" else list(table))
    unknown = sorted(set(methods) - set(table))
    if unknown:
        raise SystemExit(f"the {task} demo has no method(s) {unknown}; choose from {', '.join(table)}")
    budget = dict(QUICK if quick else {"text": TEXT_BUDGET, "lm": LM_BUDGET, "vision": VISION_BUDGET}[task])
    budget["steps"] = steps or budget["steps"]
    out = Path(output_dir) / task
    rows = []
    for i, method in enumerate(methods):
        fields, lr = table[method]
        print(f"[{i + 1}/{len(methods)}] {method}: {budget['steps']} steps, lr {lr:g}", flush=True)
        rows.append(_run_one(run_config(task, method, fields, lr, budget, out), quiet=quick))
    text = format_table(rows, task)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"task": task, "budget": budget, "rows": rows}, indent=1))
    if task != "lm":
        plot_rows = [{**r, "accuracy": r["test_accuracy"]} for r in rows]
        references = TEXT_REFERENCES if task == "text" else VISION_REFERENCES
        plot_tradeoff(plot_rows, out / "tradeoff.png", references=references)
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}" + (", tradeoff.png" if task != "lm" else ""))
    return rows
