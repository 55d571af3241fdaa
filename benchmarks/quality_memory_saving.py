"""Held-out loss of the memory-saving trainers at equal steps on `--task lm` (issue 16, quality figure).

    .venv/bin/python benchmarks/quality_memory_saving.py --time            # size first: 2 steps of each job
    .venv/bin/python benchmarks/quality_memory_saving.py                   # the run: 30 steps of 4 x 64, 2 jobs at a time
    .venv/bin/python benchmarks/quality_memory_saving.py --render          # JSON + plot again from runs/

What runs is what users run: each job is one `peftkit.train.run.run(RunConfig)` (the code path of
`peftkit train run.yaml`, whose YAML the job writes next to its metrics) in its own interpreter with
`torch.set_num_threads(1)`. Model and data are the LM demo's (`peftkit demo --task lm`): SmolLM2-135M-Instruct
(the cached plain fp32 checkpoint), Shakespeare blocks of `--seq` tokens, training on the 40 training works
(the same `steps x batch` blocks in the same seeded order for every job), the validation work (Macbeth) for
the loss curve every `--eval-every` steps, and the test work (The Tempest) for the held-out loss after
training. The loss before training (validation and test) is the same model for every job, so the `base`
job measures it once. Same budget for all: batch, steps, warm-up 10% then linear decay, seed 0. Only the
learning rate (and MeZO's ε) differ, per family, as recorded in `JOBS` and in the JSON.

Results: benchmarks/results/quality_memory_saving.json and docs/memory_saving_loss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "quality_memory_saving"
OUT_JSON = ROOT / "benchmarks" / "results" / "quality_memory_saving.json"
OUT_PNG = ROOT / "docs" / "memory_saving_loss.png"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "targets": TARGETS}

# job -> (method, adapter fields, train fields incl. lr, why this lr). Not swept (machine time): each lr is
# its family's usual fine-tuning value, one per family, written down here and in the JSON.
JOBS: dict[str, tuple[str, dict, dict, str]] = {
    "adamw-full": ("full", {}, {"lr": 2e-5}, "full FT of a small LM: 1e-5..5e-5"),
    "lora16": ("lora", LORA, {"lr": 1e-3}, "the LM demo's LoRA lr"),
    "galore64": ("full", {}, {"lr": 1e-4, "optimizer": "galore", "galore_rank": 64, "galore_scale": 0.25},
                 "alpha 0.25 x lr 1e-4 = an update of full FT's size (2.5e-5)"),
    "natural-galore64": ("full", {}, {"lr": 1e-4, "optimizer": "galore", "galore_rank": 64, "galore_scale": 0.25,
                                      "galore_natural": True}, "as GaLore"),
    "mezo-full": ("full", {}, {"lr": 1e-6, "optimizer": "mezo", "mezo_eps": 1e-3},
                  "MeZO paper, full parameters: lr 1e-6/1e-7, eps 1e-3"),
    "mezo-lora16": ("lora", LORA, {"lr": 5e-5, "optimizer": "mezo", "mezo_eps": 1e-2},
                    "MeZO paper, LoRA: lr 1e-4/5e-5, eps 1e-2"),
    "sparse-mezo": ("full", {}, {"lr": 1e-6, "optimizer": "mezo", "mezo_eps": 1e-3, "mezo_sparsity": 0.8},
                    "as MeZO full; sparsity 0.8 as bench_mezo.py"),
    "lisa2": ("full", {}, {"lr": 2e-5, "schedule": "lisa", "lisa_gamma": 2, "lisa_period": 10},
              "full FT's lr; K = 10 so a short run draws several block sets"),
    "ist-lora16": ("lora", LORA, {"lr": 1e-3, "schedule": "ist", "ist_update_interval": 10},
                   "LoRA's lr; N_u default (a quarter of 30 blocks = 7)"),
}
LABELS = {"adamw-full": "AdamW full FT", "lora16": "LoRA r16 (AdamW)", "galore64": "GaLore r64",
          "natural-galore64": "Natural GaLore r64", "mezo-full": "MeZO (full)", "mezo-lora16": "MeZO on LoRA r16",
          "sparse-mezo": "Sparse MeZO (0.8)", "lisa2": "LISA γ=2", "ist-lora16": "IST over LoRA r16"}


def run_config(job: str, args) -> dict:
    """The YAML-able run config of one job (a `peftkit train` run)."""
    method, adapter, train, _ = JOBS[job]
    data = {"dataset": "shakespeare", "max_length": args.seq, "train_size": args.steps * args.batch,
            "eval_size": args.eval_size, "test_size": args.test_size, "test_before_training": False}
    loop = {"max_steps": args.steps, "batch_size": args.batch, "eval_batch_size": 8, "warmup_ratio": 0.1,
            "eval_every": args.eval_every, "output_dir": str(RUNS / job), "log_every": 0, "progress": False,
            "save_adapter": False, "seed": 0, "overwrite": True, **train}
    return {"model": {"name": "smollm2", "task": "causal-lm"}, "data": data, "method": method,
            "adapter": adapter, "train": loop}


def job_main(job: str, args) -> dict:
    """One job in this interpreter: `base` evaluates the untrained model, any other trains it."""
    import torch
    import yaml

    torch.set_num_threads(1)
    from peftkit.train.run import load_run_config, run

    cfg = run_config("adamw-full" if job == "base" else job, args)
    out = RUNS / job
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_cfg = load_run_config(out / "run.yaml")  # typed and validated as `peftkit train` does
    started = time.perf_counter()
    if job == "base":
        return {"job": job, **base_losses(run_cfg), "wall_s": time.perf_counter() - started}
    metrics = run(run_cfg)
    return {"job": job, "wall_s": time.perf_counter() - started, "train_time_s": metrics["final"]["time_s"],
            "test_loss": metrics["test"]["loss"], "peak_rss_mb": metrics["final"]["peak_rss_mb"],
            "trainable_params": metrics["final"]["trainable_params"], "status": metrics["status"],
            "train_loss": [(r["step"], r["loss"]) for r in metrics["train_loss"]],
            "eval_loss": [(r["step"], r["loss"]) for r in metrics["eval"]]}


def base_losses(cfg) -> dict:
    """Validation and test loss of the model before any training (the same start for every job)."""
    from functools import partial

    from peftkit.train.data import collate
    from peftkit.train.loop import Dist, evaluate
    from peftkit.train.models import load_model
    from peftkit.train.run import build_datasets

    model, tokenizer = load_model(cfg.model.name, cfg.model.task)
    data = build_datasets(cfg, tokenizer)
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    figures = {name: evaluate(model, data[name], collate_fn, cfg.train, Dist(0, 1, device, False))["loss"]
               for name in ("eval", "test")}
    return {"eval_loss_before": figures["eval"], "test_loss_before": figures["test"]}


def spawn(job: str, args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, __file__, "--job", job, "--steps", str(args.steps), "--batch", str(args.batch),
           "--seq", str(args.seq), "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size),
           "--test-size", str(args.test_size)]
    RUNS.mkdir(parents=True, exist_ok=True)
    log = open(RUNS / f"{job}.log", "w")  # noqa: SIM115  (closed with the process, in run_all)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def run_all(jobs: list[str], args) -> None:
    """Run the jobs `args.parallel` at a time; each writes RUNS/<job>.json."""
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < args.parallel:
            job = pending.pop(0)
            running[job] = (spawn(job, args), time.perf_counter())
            print(f"started {job}", flush=True)
        time.sleep(2)
        for job, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                del running[job]
                print(f"{job}: exit {proc.returncode} after {time.perf_counter() - started:.0f} s", flush=True)


def collect(args) -> dict:
    """The JSON of every finished job, with its lr and settings, and the shared base losses."""
    results = {}
    for job in ["base", *JOBS]:
        path = RUNS / f"{job}.json"
        if path.is_file():
            results[job] = json.loads(path.read_text())
    base = results.pop("base", {})
    rows = []
    for job, r in results.items():
        method, adapter, train, why = JOBS[job]
        rows.append({"job": job, "label": LABELS[job], "method": method, "adapter": adapter, "train": train,
                     "lr": train["lr"], "lr_why": why, "steps": r["train_loss"][-1][0] if r["train_loss"] else 0,
                     "test_loss_before": base.get("test_loss_before"), "test_loss_after": r["test_loss"],
                     "eval_loss_before": base.get("eval_loss_before"), **r})
    cfg = run_config("adamw-full", args)
    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads_per_job": 1,
            "parallel_jobs": args.parallel, "model": "SmolLM2-135M-Instruct (fp32)", "data": cfg["data"],
            "budget": {k: cfg["train"][k] for k in ("max_steps", "batch_size", "warmup_ratio", "eval_every", "seed")},
            "base": base, "rows": rows}


def plot(summary: dict, path: Path) -> None:
    """Training loss (running mean of 5) and held-out validation loss against steps, every job on one figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    before = summary["base"].get("eval_loss_before")
    for i, row in enumerate(summary["rows"]):
        style = {"color": f"C{i}", "ls": ":" if row["train"].get("optimizer") == "mezo" else "-"}
        steps, losses = zip(*row["train_loss"], strict=True)
        smooth = [sum(losses[max(0, k - 4):k + 1]) / len(losses[max(0, k - 4):k + 1]) for k in range(len(losses))]
        left.plot(steps, smooth, lw=1.2, label=f"{row['label']} (lr {row['lr']:g})", **style)
        points = ([(0, before)] if before is not None else []) + [tuple(p) for p in row["eval_loss"]]
        right.plot(*zip(*points, strict=True), marker="o", ms=3, lw=1.2, label=row["label"], **style)
    b = summary["budget"]
    left.set(xlabel="optimizer step", ylabel="training loss (running mean of 5 steps)",
             title=f"training loss, batch {b['batch_size']} x {summary['data']['max_length']} tokens")
    right.set(xlabel="optimizer step", ylabel="held-out loss (Macbeth)", title="held-out (validation) loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M on Shakespeare: memory-saving trainers at equal steps (MeZO dotted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def table(summary: dict) -> str:
    rows = {r["job"]: r for r in summary["rows"]}
    full, lora = rows.get("adamw-full"), rows.get("lora16")
    lines = ["| job | lr | trainable | test loss before -> after | Δ | vs AdamW full FT | vs LoRA r16 | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["rows"]:
        delta = r["test_loss_after"] - r["test_loss_before"]
        vs_full = f"{r['test_loss_after'] - full['test_loss_after']:+.4f}" if full else "-"
        vs_lora = f"{r['test_loss_after'] - lora['test_loss_after']:+.4f}" if lora else "-"
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['trainable_params'] / 1e6:.2f}M | {r['test_loss_before']:.4f} "
                     f"-> {r['test_loss_after']:.4f} | {delta:+.4f} | {vs_full} | {vs_lora} | {r['train_time_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-size", type=int, default=8, help="validation blocks for the loss curve")
    parser.add_argument("--test-size", type=int, default=16, help="test blocks for the final held-out loss")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--time", action="store_true", help="size the run: 2 steps of each job, no evaluation")
    parser.add_argument("--render", action="store_true", help="only rewrite the JSON, plot and table from runs/")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        result = job_main(args.job, args)
        (RUNS / f"{args.job}.json").write_text(json.dumps(result))
        return
    if args.time:
        args.steps, args.eval_every, args.eval_size, args.test_size = 2, 0, 8, 8
        run_all(args.jobs, args)
        for job in args.jobs:
            r = json.loads((RUNS / f"{job}.json").read_text())
            print(f"{job}: {r['train_time_s'] / 2:.1f} s/step (2 steps incl. setup), wall {r['wall_s']:.0f} s")
        return
    if not args.render:
        run_all(["base", *args.jobs], args)
    summary = collect(args)
    OUT_JSON.write_text(json.dumps(summary, indent=1))
    plot(summary, OUT_PNG)
    print(table(summary))


if __name__ == "__main__":
    main()
