"""How each method's training step time and peak memory grow with rank, sequence length and model width,
next to the arithmetic it needs (arithmetic.py).

    python benchmarks/scaling.py                       # all three axes, 2 rounds (CPU, 2 cores: ~1 h)
    python benchmarks/scaling.py --axes rank --ranks 4 16 64 --configs lora16-all dora8-all
    python benchmarks/scaling.py --quick               # smoke test: tiny points, 1 round, 1 + 1 steps

Axes, each around the benchmark's model (hidden 384, 6 layers, batch 4 x 256):
  rank   4 8 16 32 64 128 (LoRA-style rank, RandLoRA's basis rank, Bone's block size, an adapter's bottleneck)
  seq    128 256 512 1024
  width  hidden 256 384 768 (intermediate 8/3 hidden rounded to 128, heads of 64)
Jobs are training jobs of bench_step's protocol (worker.py, one subprocess each, runner.py's rounds and
contention check); a point shared by two axes runs once. Each row gives the measured step time as a
multiple of the floor on the same model and sequence, the arithmetic's prediction of that multiple, the
peak memory beyond the floor and its prediction. Writes benchmarks/results/scaling/scaling-<device>.{md,png,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from arithmetic import COSTS, Shape, predicted  # noqa: E402
from protocol import CONFIGS, MODEL_SIZES, RANKED  # noqa: E402
from report import contention, environment  # noqa: E402
from runner import run_rounds  # noqa: E402

RANK_CONFIGS = ["lora16-all", "dora8-all", "adalora", "randlora", "bone", "houlsby"]
SHAPE_CONFIGS = ["full", "lora16-all", "dora8-all", "ia3", "prompt20", "adalora", "randlora", "bone", "kron", "houlsby"]
AXIS_TITLE = {"rank": "rank", "seq": "sequence length", "width": "hidden size"}


def width_model(hidden: int) -> dict:
    """LlamaConfig overrides of the benchmark model at another width ({} for its own, 384)."""
    if hidden == MODEL_SIZES["small"]["hidden_size"]:
        return {}
    return {"hidden_size": hidden, "intermediate_size": 128 * round(8 * hidden / 3 / 128),
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64}


def points(args) -> list[dict]:
    """(axis, value, config, library, job fields) for every measured point, floors included."""
    out = []
    axes = {"rank": [(r, {"seq": args.base_seq, "model": {}, "rank": r}) for r in args.ranks],
            "seq": [(s, {"seq": s, "model": {}, "rank": None}) for s in args.seqs],
            "width": [(h, {"seq": args.base_seq, "model": width_model(h), "rank": None}) for h in args.widths]}
    for axis in args.axes:
        configs = [c for c in (args.configs or (RANK_CONFIGS if axis == "rank" else SHAPE_CONFIGS))
                   if axis != "rank" or c in RANKED]
        for value, fields in axes[axis]:
            for c in ["floor", *configs]:
                libs = [lib for lib in CONFIGS[c][1] if lib != "peft" or args.peft]
                fields_c = {**fields, "rank": fields["rank"] if c in RANKED else None}
                out += [{"axis": axis, "value": value, "config": c, "lib": lib, **fields_c} for lib in libs]
    return out


def job_key(p: dict) -> str:
    return json.dumps([p["lib"], p["config"], p["seq"], p["model"], p["rank"]])


def job_specs(args, pts: list[dict]) -> list[dict]:
    """One training spec per distinct point (a point shared by two axes runs once)."""
    common = {"kind": "train", "device": args.device, "dtype": args.dtype, "model_size": "small", "seed": 0,
              "batch": args.batch, "threads": args.threads, "warmup": args.warmup, "steps": args.steps}
    specs = {}
    for p in pts:
        specs.setdefault(job_key(p), {**common, **{k: p[k] for k in ("lib", "config", "seq", "model", "rank")}})
    return list(specs.values())


def summarise(pts: list[dict], rounds: list[list[dict]], batch: int) -> list[dict]:
    """Per point: medians over rounds, x floor and extra memory within a round, and the arithmetic."""
    by_round = [{job_key(r): r for r in res} for res in rounds]
    rows = []
    for p in (p for p in pts if p["config"] != "floor"):
        floor_key = job_key({**p, "lib": "torch", "config": "floor", "rank": None})
        runs = [(res[job_key(p)], res[floor_key]) for res in by_round if job_key(p) in res and floor_key in res]
        if not runs:
            continue
        job, floor = runs[0]
        shape = Shape.of({**MODEL_SIZES["small"], **p["model"]}, p["seq"], batch)
        floor_peak = statistics.median(f["peak_delta_mb"] for _, f in runs)
        rows.append({**p, "label": CONFIGS[p["config"]][0], "trainable": job["trainable"],
                     "step_ms": statistics.median(j["step_ms"] for j, _ in runs),
                     "x_floor": statistics.median(j["step_ms"] / f["step_ms"] for j, f in runs),
                     "peak_delta_mb": statistics.median(j["peak_delta_mb"] for j, _ in runs),
                     "extra_mb": statistics.median(j["peak_delta_mb"] - f["peak_delta_mb"] for j, f in runs),
                     "predicted": predicted(p["config"], shape, p["rank"], job["trainable"], floor_peak)})
    return rows


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    from tables import header

    lines = header(report, f"Scaling with rank, sequence length and width ({report['args']['device']})")
    lines += ["", "## The arithmetic (arithmetic.py)", "",
              "Per training token; T = tokens per step; floor = layers (3 seq d + 2 Σ d_in d_out) + 2 d V MACs. "
              "Predicted x floor = (floor + extra) / floor; predicted extra memory = trainable x 16 bytes (full: 12) "
              "+ what the method saves for backward.", "",
              "| config | extra training MACs per token | extra saved for backward |", "| --- | --- | --- |"]
    configs = list(dict.fromkeys(r["config"] for r in report["rows"]))
    lines += [f"| {CONFIGS[c][0]} | {COSTS[c].macs_text} | {COSTS[c].saved_text} |" for c in configs if c in COSTS]
    for axis in report["args"]["axes"]:
        rows = [r for r in report["rows"] if r["axis"] == axis]
        lines += ["", f"## Scaling with the {AXIS_TITLE[axis]}", "",
                  f"| config | library | {AXIS_TITLE[axis]} | trainable | step ms | x floor | predicted x floor "
                  "| peak delta MB | extra MB over floor | predicted extra MB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(rows, key=lambda r: (configs.index(r["config"]), r["lib"], r["value"])):
            pred = r["predicted"] or {}
            lines.append(f"| {r['label']} | {r['lib']} | {r['value']} | {r['trainable']:,} | {r['step_ms']:.0f} | "
                         f"{r['x_floor']:.2f} | {fmt(pred.get('x_floor'))} | {r['peak_delta_mb']:.0f} | "
                         f"{r['extra_mb']:.0f} | {fmt(pred.get('extra_mb'), '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Measured (solid) and predicted (dashed) x floor and extra memory along each axis, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = report["args"]["axes"]
    fig, axes = plt.subplots(2, len(axes_names), figsize=(4.6 * len(axes_names), 7), squeeze=False)
    configs = list(dict.fromkeys(r["config"] for r in report["rows"]))
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(configs)}
    for col, axis in enumerate(axes_names):
        for c in configs:
            rows = sorted((r for r in report["rows"] if r["axis"] == axis and r["config"] == c and r["lib"] != "peft"),
                          key=lambda r: r["value"])
            if not rows:
                continue
            xs = [r["value"] for r in rows]
            for row, (key, pred) in enumerate((("x_floor", "x_floor"), ("extra_mb", "extra_mb"))):
                ax = axes[row, col]
                ax.plot(xs, [r[key] for r in rows], "o-", color=colors[c], label=c, ms=3)
                if all(r["predicted"] for r in rows):
                    ax.plot(xs, [r["predicted"][pred] for r in rows], "--", color=colors[c], lw=0.8)
        for row, label in enumerate(("step / floor", "extra peak MB over floor")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(AXIS_TITLE[axis])
            ax.set_ylabel(label)
    handles = [plt.Line2D([], [], color=colors[c], marker="o", ms=3) for c in configs]
    fig.legend(handles, configs, fontsize=7, loc="center right")
    fig.suptitle("measured (solid) vs arithmetic (dashed)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--axes", nargs="+", choices=list(AXIS_TITLE), default=list(AXIS_TITLE))
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="instead of each axis' default list")
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--seqs", nargs="+", type=int, default=[128, 256, 512, 1024])
    p.add_argument("--widths", nargs="+", type=int, default=[256, 384, 768])
    p.add_argument("--base-seq", type=int, default=256, help="sequence length of the rank and width axes")
    p.add_argument("--peft", action="store_true", help="also run Hugging Face peft where it has the configuration")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--quick", action="store_true", help="smoke test: ranks 4 16, seqs 32 64, widths 128 384")
    p.add_argument("--out", default=str(HERE / "results" / "scaling"))
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.quick:
        args.ranks, args.seqs, args.widths, args.base_seq = [4, 16], [32, 64], [128, 384], 64
        args.rounds, args.warmup, args.steps = 1, 1, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment(args)
    pts = points(args)
    rounds = run_rounds(job_specs(args, pts), args.rounds, args.retries)
    env["loadavg_end"] = list(os.getloadavg())
    shown = {**vars(args), "seq": sorted({p["seq"] for p in pts}), "model_size": "small"}
    report = {"environment": env, "args": shown, "contention": contention(args, rounds),
              "rows": summarise(pts, rounds, args.batch), "raw": rounds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"scaling-{args.device}" + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))
    plot(report, out / f"{stem}.png")
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
