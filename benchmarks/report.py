"""The benchmark report: medians and ratios over rounds (per sequence length), the targets, the run's
environment, and the files (Markdown and plot from tables.py, JSON with every job's raw numbers)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

from protocol import ADAPTERS, CONFIGS, ISSUE3, MERGEABLE, PROMPT_LIKE, UNCONTENDED

HERE = Path(__file__).resolve().parent
TARGETS = [  # (source, configurations, metric, upper limit); a target is checked where the run has the value
    ("foundation", ["lora16-all"], "x_floor", 1.15),
    ("foundation", ["lora16-all"], "x_peft", 1.00),
    ("issues 3, 5", ISSUE3, "x_floor", 1.3),
    ("issue 3", ISSUE3, "mem_x_lora16", 1.1),
    # issue 4: DiffFit and LN tuning have no figure there (measured, not judged)
    ("issue 4", [*ADAPTERS, "ssf", "bitfit", "lofit-s1", "lofit16"], "x_floor", 1.15),
    ("issue 4", PROMPT_LIKE, "x_floor", 1.25),  # peft's prompt tuning: 1.21
    ("issue 5", ["lora16-all"], "x_floor", 1.10),
    ("issue 5", ["lora16-all"], "x_peft", 0.90),
    ("issue 5", ["dora8-all"], "x_floor", 1.25),
    ("issue 5", ["dora8-all"], "mem_x_lora16", 1.1),
    ("issue 5", ["ia3"], "x_floor", 1.05),
    ("issue 5", list(CONFIGS), "mem_x_peft", 1.0),
    ("issue 5", MERGEABLE, "merged_x_base", 1.02),
]
METRICS = {"x_floor": "step x floor", "x_peft": "step x peft", "mem_x_lora16": "peak memory x LoRA r16 all linear's",
           "mem_x_peft": "peak memory x peft's", "merged_x_base": "merged forward x base"}


def median_ratio(rounds: list[list[dict]], num, den) -> float | None:
    """Median over rounds of num(round) / den(round); None when no round has both."""
    ratios = []
    for results in rounds:
        a, b = num(results), den(results)
        if a is not None and b:
            ratios.append(a / b)
    return statistics.median(ratios) if ratios else None


def pick(results: list[dict], lib: str, config: str, key: str, size: str, seq: int) -> float | None:
    """`key` of the training job (lib, config) on model size `size` and sequence `seq` in one round."""
    found = [r[key] for r in results if r["kind"] == "train" and r["lib"] == lib and r["config"] == config
             and r["model_size"] == size and r["seq"] == seq]
    return found[0] if found else None


def train_rows(rounds: list[list[dict]], configs: list[str], main_size: str, seq: int) -> list[dict]:
    """One row per (config, library, model size) at `seq`; x floor against the floor of the same size."""
    rows = []
    jobs = [r for res in rounds for r in res if r["kind"] == "train" and r["seq"] == seq]
    sizes = list(dict.fromkeys(r["model_size"] for r in jobs))
    for c in configs:
        for lib in CONFIGS[c][1]:
            for size in sizes:
                runs = [r for r in jobs if r["lib"] == lib and r["config"] == c and r["model_size"] == size]
                if runs:
                    rows.append(train_row(rounds, runs, (c, lib, size, seq), size != main_size))
    lora = next((r for r in rows if r["config"] == "lora16-all" and r["lib"] == "peftkit"), None)
    for row in rows:
        if lora and row["lib"] == "peftkit" and row["model_size"] == lora["model_size"] and lora["peak_delta_mb"] > 0:
            row["mem_x_lora16"] = row["peak_delta_mb"] / lora["peak_delta_mb"]
    return rows


def train_row(rounds: list[list[dict]], runs: list[dict], key: tuple, show_size: bool) -> dict:
    c, lib, size, seq = key
    row = {"config": c, "label": CONFIGS[c][0] + (f" [{size}]" if show_size else ""),
           "lib": lib, "model_size": size, "trainable_pct": 100 * runs[0]["trainable"] / runs[0]["base_params"],
           "step_ms": statistics.median(r["step_ms"] for r in runs),
           "step_ms_range": [min(r["step_ms"] for r in runs), max(r["step_ms"] for r in runs)],
           "peak_delta_mb": statistics.median(r["peak_delta_mb"] for r in runs),
           "x_floor": median_ratio(rounds, lambda res: pick(res, lib, c, "step_ms", size, seq),
                                   lambda res: pick(res, "torch", "floor", "step_ms", size, seq)),
           "x_peft": None, "mem_x_peft": None, "mem_x_lora16": None}
    if lib == "peftkit":
        for k, out in (("step_ms", "x_peft"), ("peak_delta_mb", "mem_x_peft")):
            row[out] = median_ratio(rounds, lambda res, k=k: pick(res, "peftkit", c, k, size, seq),
                                    lambda res, k=k: pick(res, "peft", c, k, size, seq))
    return row


def infer_rows(rounds: list[list[dict]], configs: list[str], seq: int) -> list[dict]:
    """Per (config, library) at `seq`: median forward ms per variant and the median in-process ratio to base."""
    rows = []
    jobs = [r for res in rounds for r in res if r["kind"] == "infer" and r["seq"] == seq]
    for c in configs:
        for lib in CONFIGS[c][1]:
            runs = [r for r in jobs if r["config"] == c and r["lib"] == lib]
            if not runs:
                continue
            variants = list(runs[0]["forward_ms"])
            diffs = [r["merged_vs_unmerged_max_abs_logit_diff"] for r in runs]
            rows.append({"config": c, "label": CONFIGS[c][0], "lib": lib,
                         "forward_ms": {v: statistics.median(r["forward_ms"][v] for r in runs) for v in variants},
                         "x_base": {v: statistics.median(r["forward_ms"][v] / r["forward_ms"]["base"] for r in runs)
                                    for v in variants},
                         "merged_x_base": None,
                         "max_merge_diff": None if diffs[0] is None else max(diffs),
                         "adapter_changes_output": min(r["adapter_vs_base_max_abs_logit_diff"] for r in runs)})
            rows[-1]["merged_x_base"] = rows[-1]["x_base"].get("merged")
    return rows


def paired_rows(rounds: list[list[dict]], configs: list[str], seq: int) -> list[dict]:
    """Per (config, library) at `seq`: the per-cycle ratios of the paired jobs (paired.py) pooled over
    rounds; x floor and, for peftkit where peft runs, x peft as medians with quartiles."""
    import paired

    rows = []
    jobs = [r for res in rounds for r in res if r["kind"] == "paired" and r["seq"] == seq]
    for c in configs:
        runs = [r for r in jobs if r["config"] == c]
        for lib in CONFIGS[c][1] if runs else []:
            x_floor = [x for r in runs for x in r["ratios"][lib]]
            x_peft = [x for r in runs for x in r["ratios"].get("peftkit/peft", [])] if lib == "peftkit" else []
            rows.append({"config": c, "label": CONFIGS[c][0] + " (paired)", "lib": lib, "cycles": len(x_floor),
                         "x_floor": statistics.median(x_floor), "x_floor_quartiles": paired.quartiles(x_floor),
                         "x_peft": statistics.median(x_peft) if x_peft else None,
                         "x_peft_quartiles": paired.quartiles(x_peft) if x_peft else None})
    return rows


def targets(section: dict) -> list[str]:
    """The agreed targets that this section has values for, each with its value and met / MISSED."""
    out = []
    rows = [r for r in section["train"] + section["infer"] + section.get("paired", []) if r["lib"] == "peftkit"]
    for source, configs, metric, limit in TARGETS:
        for row in rows:
            value = row.get(metric)
            if row["config"] in configs and value is not None:
                out.append(f"[{source}] {row['label']}, {METRICS[metric]} <= {limit}: {value:.3f} "
                           f"({'met' if value <= limit else 'MISSED'})")
    return out


def file_targets(file_result: dict) -> list[str]:
    f = file_result["peftkit"]
    return [f"[foundation] adapter file overhead < 8 KiB: safetensors {f['safetensors_overhead']} B "
            f"({'met' if f['safetensors_overhead'] < 8192 else 'MISSED'}), with the JSON "
            f"{f['total_overhead']} B ({'met' if f['total_overhead'] < 8192 else 'MISSED'})"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(args) -> dict:
    """Date, machine and versions, recorded in every results file."""
    import matplotlib
    import peft
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "peftkit"], capture_output=True, text=True,
                           cwd=HERE.parent).stdout.strip()
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "platform": platform.platform(), "processor": cpu_model(),
           "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__,
           "matplotlib": matplotlib.__version__, "peftkit_commit": commit + ("+dirty" if dirty else ""),
           "loadavg_start": list(os.getloadavg()),
           # glibc's heap trimming decides how many pages a step faults in again (see NOTES.md)
           "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}}
    if args.device == "cuda":
        env["gpu"] = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    return env


def contention(args, rounds: list[list[dict]]) -> str:
    jobs = [r for res in rounds for r in res]
    still = [f"{r['lib']} {r.get('config', '')} seq {r['seq']} (round {r['round'] + 1})" for r in jobs
             if r.get("contended")]
    return (f"{sum(r['attempts'] > 1 for r in jobs)} of {len(jobs)} jobs were repeated because another "
            f"process took CPU from them (CPU/wall < {UNCONTENDED} x threads); still contended after "
            f"{args.retries} repeats: {', '.join(still) or 'none'}")


def results_stem(args) -> str:
    """results-<device>[-<size>][-<suite>][-quick]: CUDA results always go to their own files."""
    size = "" if args.model_size == "small" else f"-{args.model_size}"
    suite = "" if args.suite in ("issue5", None) else f"-{args.suite}"
    return f"results-{args.device}{size}{suite}" + ("-quick" if args.quick else "")


def write_report(args, rounds: list[list[dict]], env: dict, file_result: dict | None) -> Path:
    from tables import markdown, plot

    env["loadavg_end"] = list(os.getloadavg())
    sections = []
    for seq in args.seq:
        section = {"seq": seq, "train": train_rows(rounds, args.configs, args.model_size, seq),
                   "infer": infer_rows(rounds, args.infer_configs, seq),
                   "paired": paired_rows(rounds, args.configs, seq)}
        section["targets"] = targets(section)
        sections.append(section)
    report = {"environment": env, "args": vars(args), "contention": contention(args, rounds), "sections": sections,
              "file": file_result, "file_targets": file_targets(file_result) if file_result else [],
              "raw": rounds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(args)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))
    plot(report, out / f"{stem}.png")
    return out / f"{stem}.md"


def rerender(path: Path) -> Path:
    """Rewrite the Markdown and the plot next to a results JSON from the numbers in it (no job runs)."""
    from tables import markdown, plot

    report = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(report))
    plot(report, path.with_suffix(".png"))
    return path.with_suffix(".md")
