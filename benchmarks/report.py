"""The benchmark report: medians and ratios over rounds, the Markdown tables, the targets and the plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

from protocol import CONFIGS, INFER_VARIANTS, ISSUE3, ISSUE4, PROMPT_LIKE, UNCONTENDED

HERE = Path(__file__).resolve().parent
ISSUE4_LIMITS = {**dict.fromkeys(["houlsby", "pfeiffer", "parallel", "ssf", "bitfit", "lofit-s1", "lofit16"], 1.15),
                 **dict.fromkeys(PROMPT_LIKE, 1.25)}
"""Issue 4's step-time limits (x the floor on the same model): adapters, SSF, BitFit, LoFiT 1.15; prompt-style
1.25 (peft's prompt tuning: 1.21). DiffFit and LN tuning have no figure there: measured, not judged."""


def median_ratio(rounds: list[list[dict]], num, den) -> float | None:
    """Median over rounds of num(round) / den(round); None when a round lacks either."""
    ratios = []
    for results in rounds:
        a, b = num(results), den(results)
        if a is not None and b:
            ratios.append(a / b)
    return statistics.median(ratios) if ratios else None


def pick(results: list[dict], lib: str, config: str, key: str, size: str | None = None) -> float | None:
    """`key` of the training job (lib, config) in one round, on model size `size` if given."""
    found = [r[key] for r in results if r["kind"] == "train" and r["lib"] == lib and r["config"] == config
             and size in (None, r["model_size"])]
    return found[0] if found else None


def train_rows(rounds: list[list[dict]], configs: list[str], main_size: str) -> list[dict]:
    """One summary row per (config, library, model size); x floor against the floor on the same model size."""
    rows = []
    jobs = [r for res in rounds for r in res if r["kind"] == "train"]
    sizes = list(dict.fromkeys(r["model_size"] for r in jobs))
    for c in configs:
        for lib in CONFIGS[c][1]:
            for size in sizes:
                runs = [r for r in jobs if r["lib"] == lib and r["config"] == c and r["model_size"] == size]
                if runs:
                    rows.append(train_row(rounds, runs, c, lib, size, size != main_size))
    return rows


def train_row(rounds: list[list[dict]], runs: list[dict], c: str, lib: str, size: str, show_size: bool) -> dict:
    row = {"config": c, "label": CONFIGS[c][0] + (f" [{size}]" if show_size else ""),
           "lib": lib, "model_size": size, "trainable_pct": 100 * runs[0]["trainable"] / runs[0]["base_params"],
           "step_ms": statistics.median(r["step_ms"] for r in runs),
           "step_ms_range": [min(r["step_ms"] for r in runs), max(r["step_ms"] for r in runs)],
           "peak_delta_mb": statistics.median(r["peak_delta_mb"] for r in runs),
           "x_floor": median_ratio(rounds, lambda res: pick(res, lib, c, "step_ms", size),
                                   lambda res: pick(res, "torch", "floor", "step_ms", size)),
           "x_peft": None, "mem_x_peft": None}
    if lib == "peftkit":
        for key, out in (("step_ms", "x_peft"), ("peak_delta_mb", "mem_x_peft")):
            row[out] = median_ratio(rounds, lambda res, key=key: pick(res, "peftkit", c, key, size),
                                    lambda res, key=key: pick(res, "peft", c, key, size))
    return row


def infer_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per library and variant: median forward ms and the median of the in-process ratio to base."""
    rows = []
    for lib in ("peft", "peftkit"):
        runs = [r for res in rounds for r in res if r["kind"] == "infer" and r["lib"] == lib]
        if not runs:
            continue
        for v in INFER_VARIANTS:
            rows.append({"lib": lib, "variant": v,
                         "forward_ms": statistics.median(r["forward_ms"][v] for r in runs),
                         "x_base": statistics.median(r["forward_ms"][v] / r["forward_ms"]["base"] for r in runs),
                         "max_logit_diff": max(r["merged_vs_unmerged_max_abs_logit_diff"] for r in runs)})
    return rows


def environment(args) -> dict:
    import matplotlib
    import peft
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "peftkit"], capture_output=True, text=True,
                           cwd=HERE.parent).stdout.strip()
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__,
           "matplotlib": matplotlib.__version__, "peftkit_commit": commit + ("+dirty" if dirty else ""),
           "loadavg_start": list(os.getloadavg())}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# --- report --------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    env, a = report["environment"], report["args"]
    lines = [f"# peftkit vs peft: training step, memory, inference ({a['device']}, model {a['model_size']})", "",
             f"- date: {env['date']}; machine: {env['platform']}, {env['processor']}, nproc {env['nproc']} "
             f"(usable {env['usable_cpus']}){'; GPU ' + env['gpu'] if 'gpu' in env else ''}",
             f"- torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"python {env['python']}, peftkit at {env['peftkit_commit']}",
             f"- protocol: batch {a['batch']} x {a['seq']}, {a['threads']} threads, {a['warmup']} warm-up + "
             f"{a['steps']} timed steps, {a['rounds']} round(s) in shuffled order, one subprocess per job; "
             f"medians. Load average at start {env['loadavg_start'][0]:.2f}, at end {env['loadavg_end'][0]:.2f}.",
             f"- contention: {report['contention']}",
             "", "## Training step", "",
             "| config | library | trainable % | step ms (median) | x floor | x peft | peak delta MB | memory x peft "
             "| step ms min-max over rounds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["train"]:
        lines.append(f"| {r['label']} | {r['lib']} | {r['trainable_pct']:.2f} | {r['step_ms']:.0f} | "
                     f"{fmt(r['x_floor'])} | {fmt(r['x_peft'])} | {r['peak_delta_mb']:.0f} | {fmt(r['mem_x_peft'])} | "
                     f"{r['step_ms_range'][0]:.0f}-{r['step_ms_range'][1]:.0f} |")
    if report["infer"]:
        lines += ["", f"## Inference (forward only, no grad, {a['infer_steps']} interleaved forwards per variant)",
                  "", "| library | variant | forward ms (median) | x base (same process) | max logit diff merged vs unmerged |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['lib']} | {r['variant']} | {r['forward_ms']:.1f} | {r['x_base']:.3f} | "
                  f"{r['max_logit_diff']:.1e} |" for r in report["infer"]]
    if report.get("file"):
        lines += ["", "## LoRA r16 all-linear adapter file", "",
                  "| library | tensor bytes | safetensors bytes | safetensors overhead | JSON bytes | total overhead |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {lib} | {f['tensor_bytes']} | {f['safetensors_bytes']} | {f['safetensors_overhead']} | "
                  f"{f['json_bytes']} | {f['total_overhead']} ({f['total_overhead'] / 1024:.1f} KiB) |"
                  for lib, f in report["file"].items()]
    lines += ["", "## Targets (peftkit, this run)", ""] + [f"- {t}" for t in targets(report)]
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[str]:
    """The agreed targets, each with its measured value and met / MISSED."""
    out = []

    def check(name: str, value: float | None, ok) -> None:
        if value is not None:
            out.append(f"{name}: {value:.3f} ({'met' if ok(value) else 'MISSED'})")

    lora = next((r for r in report["train"] if r["config"] == "lora16-all" and r["lib"] == "peftkit"), None)
    if lora:
        check("LoRA r16 all linear, step x floor <= 1.15", lora["x_floor"], lambda v: v <= 1.15)
        check("LoRA r16 all linear, step x peft <= 1.00", lora["x_peft"], lambda v: v <= 1.0)
    for row in (r for r in report["train"] if r["config"] in ISSUE3 and r["lib"] == "peftkit"):
        check(f"{row['label']}, step x floor <= 1.3", row["x_floor"], lambda v: v <= 1.3)
        if lora and row.get("peak_delta_mb") and lora.get("peak_delta_mb"):
            check(f"{row['label']}, peak memory x LoRA r16 all linear <= 1.1",
                  row["peak_delta_mb"] / lora["peak_delta_mb"], lambda v: v <= 1.1)
    for row in (r for r in report["train"] if r["config"] in ISSUE4 and r["lib"] == "peftkit"):
        limit = ISSUE4_LIMITS.get(row["config"])
        if limit is not None:
            check(f"{row['label']}, step x floor <= {limit}", row["x_floor"], lambda v, limit=limit: v <= limit)
    merged = next((r for r in report["infer"] if r["lib"] == "peftkit" and r["variant"] == "lora16-merged"), None)
    if merged:
        check("merged LoRA r16 forward x base <= 1.02", merged["x_base"], lambda v: v <= 1.02)
    if report.get("file"):
        f = report["file"]["peftkit"]
        out.append(f"adapter file overhead < 8 KiB: safetensors {f['safetensors_overhead']} B "
                   f"({'met' if f['safetensors_overhead'] < 8192 else 'MISSED'}), with the JSON "
                   f"{f['total_overhead']} B ({'met' if f['total_overhead'] < 8192 else 'MISSED'})")
    return out


def plot(report: dict, path: Path) -> None:
    """Step time x floor per config, peft and peftkit side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in report["train"]))
    colors = {"torch": "0.55", "peft": "tab:orange", "peftkit": "tab:blue"}
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(configs)), 4))
    for i, c in enumerate(configs):
        rows = [r for r in report["train"] if r["config"] == c and r["x_floor"] is not None]
        for j, r in enumerate(rows):
            x = i + (j - (len(rows) - 1) / 2) * 0.38
            ax.bar(x, r["x_floor"], 0.36, color=colors[r["lib"]])
            ax.text(x, r["x_floor"], f"{r['x_floor']:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(range(len(configs)), [CONFIGS[c][0].replace(" on ", "\non ").replace(", ", "\n")
                                        for c in configs], fontsize=7)
    ax.set_ylabel("step time / floor (median over rounds)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=v) for v in colors.values()]
    ax.legend(handles, ["reference (no library)", "peft", "peftkit"], fontsize=7, loc="upper center", ncol=3)
    ax.set_ylim(0, 1.18 * max(r["x_floor"] for r in report["train"] if r["x_floor"] is not None))
    env, a = report["environment"], report["args"]
    ax.set_title(f"{a['device']} {a['model_size']}, batch {a['batch']}x{a['seq']}, torch {env['torch']}, "
                 f"peft {env['peft']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_report(args, rounds: list[list[dict]], env: dict, file_result: dict | None) -> Path:
    env["loadavg_end"] = list(os.getloadavg())
    jobs = [r for res in rounds for r in res]
    still = [f"{r['lib']} {r.get('config', 'inference')} (round {r['round'] + 1})" for r in jobs if r.get("contended")]
    contention = (f"{sum(r['attempts'] > 1 for r in jobs)} of {len(jobs)} jobs were repeated because another "
                  f"process took CPU from them (CPU/wall < {UNCONTENDED} x threads); still contended after "
                  f"{args.retries} repeats: {', '.join(still) or 'none'}")
    report = {"environment": env, "args": vars(args), "contention": contention, "train": train_rows(rounds, args.configs, args.model_size),
              "infer": infer_rows(rounds), "file": file_result,
              "raw": [[{k: v for k, v in r.items() if k != "json_text"} for r in res] for res in rounds]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"results-{args.device}" + ("" if args.model_size == "small" else f"-{args.model_size}") + (
        "-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))
    plot(report, out / f"{stem}.png")
    return out / f"{stem}.md"
