"""The benchmark report's Markdown (a training and an inference table per sequence length) and its plot."""

from __future__ import annotations

import textwrap
from pathlib import Path

from protocol import CONFIGS


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def header(report: dict, title: str) -> list[str]:
    """Title, date, machine, versions and protocol: the lines every results file starts with."""
    env, a = report["environment"], report["args"]
    dtype = a.get("dtype") or "fp32"
    return [f"# {title}", "",
            f"- date: {env['date']}; machine: {env['platform']}, {env['processor']}, nproc {env['nproc']} "
            f"(usable {env['usable_cpus']}){'; GPU ' + env['gpu'] if 'gpu' in env else ''}",
            f"- torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
            f"python {env['python']}, peftkit at {env['peftkit_commit']}",
            f"- protocol: {a['device']}, {dtype} weights{', bf16 autocast' if dtype == 'bf16' else ''}, "
            f"batch {a['batch']} x seq {', '.join(map(str, a['seq']))}, {a['threads']} threads, {a['warmup']} "
            f"warm-up + {a['steps']} timed steps, {a['rounds']} round(s) in shuffled order, one subprocess per "
            f"job; medians. Load average at start {env['loadavg_start'][0]:.2f}, at end "
            f"{env['loadavg_end'][0]:.2f}.",
            f"- contention: {report['contention']}"]


def train_table(rows: list[dict]) -> list[str]:
    lines = ["| config | library | trainable % | step ms (median) | x floor | x peft | peak delta MB | memory x peft "
             "| step ms min-max over rounds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['lib']} | {r['trainable_pct']:.2f} | {r['step_ms']:.0f} | "
                     f"{fmt(r['x_floor'])} | {fmt(r['x_peft'])} | {r['peak_delta_mb']:.0f} | {fmt(r['mem_x_peft'])} | "
                     f"{r['step_ms_range'][0]:.0f}-{r['step_ms_range'][1]:.0f} |")
    return lines


def infer_table(rows: list[dict]) -> list[str]:
    lines = ["| config | library | base ms | unmerged ms | merged ms | unmerged x base | merged x base "
             "| max logit diff merged vs unmerged |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ms, x = r["forward_ms"], r["x_base"]
        lines.append(f"| {r['label']} | {r['lib']} | {ms['base']:.1f} | {ms['unmerged']:.1f} | "
                     f"{fmt(ms.get('merged'), '.1f')} | {x['unmerged']:.3f} | {fmt(x.get('merged'), '.3f')} | "
                     f"{fmt(r['max_merge_diff'], '.1e')} |")
    return lines


def paired_table(rows: list[dict]) -> list[str]:
    lines = ["| config | library | cycles | x floor (median) | quartiles | x peft (median) | quartiles |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        q, qp = r["x_floor_quartiles"], r["x_peft_quartiles"]
        lines.append(f"| {r['label']} | {r['lib']} | {r['cycles']} | {r['x_floor']:.3f} | {q[0]:.3f}-{q[1]:.3f} | "
                     f"{fmt(r['x_peft'], '.3f')} | {'' if qp is None else f'{qp[0]:.3f}-{qp[1]:.3f}'} |")
    return lines


def summary_table(sections: list[dict]) -> list[str]:
    """One row per configuration: step x floor of each library at every sequence length, then peftkit's
    step and peak memory x peft's (the table the README quotes)."""
    seqs = [s["seq"] for s in sections]
    cols = [f"{lib} x floor @{q}" for q in seqs for lib in ("peftkit", "peft")]
    cols += [f"x peft @{q}" for q in seqs] + [f"memory x peft @{q}" for q in seqs]
    lines = ["| config | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    labels = list(dict.fromkeys((r["config"], r["label"]) for s in sections for r in s["train"]
                                if r["config"] != "floor"))

    def value(s: dict, label: str, lib: str, key: str) -> float | None:
        row = next((r for r in s["train"] if r["label"] == label and r["lib"] == lib), None)
        return None if row is None else row[key]

    for config, label in labels:
        lib = "torch" if config in ("floor", "full") else "peftkit"
        cells = [fmt(value(s, label, lb, "x_floor")) for s in sections for lb in (lib, "peft")]
        cells += [fmt(value(s, label, lib, k)) for k in ("x_peft", "mem_x_peft") for s in sections]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    a = report["args"]
    lines = header(report, f"peftkit vs peft: training step, memory, inference ({a['device']}, model "
                           f"{a['model_size']})")
    if any(s["train"] for s in report["sections"]):  # a --paired-only run has no protocol jobs
        lines += ["", "## Summary (medians of per-round ratios; full fine-tuning is plain torch)", "",
                  *summary_table(report["sections"])]
    for s in report["sections"]:
        if s["train"]:
            lines += ["", f"## Sequence {s['seq']}: training step", "", *train_table(s["train"])]
        if s.get("paired"):
            lines += ["", f"## Sequence {s['seq']}: paired timing (the floor and each library's model in one "
                          "process, cycles of one step each in a shuffled order; medians and quartiles of the "
                          "per-cycle ratios, pooled over rounds: `cycles` counts them)", "",
                      *paired_table(s["paired"])]
        if s["infer"]:
            lines += ["", f"## Sequence {s['seq']}: inference (forward only, no grad, {a['infer_steps']} interleaved "
                          "forwards per variant, one process per configuration and library)", "",
                      *infer_table(s["infer"])]
    if report.get("file"):
        lines += ["", "## LoRA r16 all-linear adapter file", "",
                  "| library | tensor bytes | safetensors bytes | safetensors overhead | JSON bytes | total overhead |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {lib} | {f['tensor_bytes']} | {f['safetensors_bytes']} | {f['safetensors_overhead']} | "
                  f"{f['json_bytes']} | {f['total_overhead']} ({f['total_overhead'] / 1024:.1f} KiB) |"
                  for lib, f in report["file"].items()]
    for s in report["sections"]:
        lines += ["", f"## Targets at sequence {s['seq']} (peftkit, this run)", ""]
        lines += [f"- {t}" for t in s["targets"]] or ["- (none of the targeted configurations ran)"]
    lines += [f"- {t}" for t in report.get("file_targets", [])]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Step time x floor per configuration, peft and peftkit side by side; one panel per sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = report["sections"]
    configs = list(dict.fromkeys(r["config"] for s in sections for r in s["train"] + s.get("paired", [])))
    colors = {"torch": "0.55", "peft": "tab:orange", "peftkit": "tab:blue"}
    fig, axes = plt.subplots(len(sections), 1, figsize=(max(6, 1.1 * len(configs)), 3.6 * len(sections)),
                             squeeze=False)
    top = max([r["x_floor"] for s in sections for r in s["train"] if r["x_floor"] is not None]
              + [r["x_floor_quartiles"][1] for s in sections for r in s.get("paired", [])], default=1.0)
    for ax, s in zip(axes[:, 0], sections, strict=True):
        for i, c in enumerate(configs):
            rows = [r for r in s["train"] if r["config"] == c and r["x_floor"] is not None]
            for j, r in enumerate(rows):
                x = i + (j - (len(rows) - 1) / 2) * 0.38
                ax.bar(x, r["x_floor"], 0.36, color=colors[r["lib"]])
                ax.text(x, r["x_floor"], f"{r['x_floor']:.2f}", ha="center", va="bottom", fontsize=6)
            paired = [r for r in s.get("paired", []) if r["config"] == c]
            for j, r in enumerate(paired):  # the paired estimate: median, bar from quartile to quartile
                x = i + (j - (len(paired) - 1) / 2) * 0.38
                lo, hi = r["x_floor_quartiles"]
                ax.errorbar(x, r["x_floor"], yerr=[[r["x_floor"] - lo], [hi - r["x_floor"]]], fmt="_", color="k",
                            ms=9, capsize=2, lw=0.8)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xticks(range(len(configs)), [textwrap.fill(CONFIGS[c][0], 16) for c in configs], fontsize=6)
        ax.set_ylabel(f"seq {s['seq']}: step / floor")
        ax.set_ylim(0, 1.18 * top)
    handles = [plt.Rectangle((0, 0), 1, 1, color=v) for v in colors.values()]
    handles.append(plt.Line2D([], [], color="k", marker="_", ls="", ms=9))
    axes[0, 0].legend(handles, ["reference (no library)", "peft", "peftkit", "paired in one process (median, quartiles)"],
                      fontsize=7, loc="upper center", ncol=4)
    env, a = report["environment"], report["args"]
    axes[0, 0].set_title(f"{a['device']} {a['model_size']}, batch {a['batch']}, median over {a['rounds']} round(s); "
                         f"torch {env['torch']}, peft {env['peft']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
