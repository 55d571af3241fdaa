"""GaLore / Natural GaLore against AdamW full fine-tuning and galore-torch on SmolLM2-135M (issue 16).

Rows, each in its own fresh process (so that its peak memory, VmHWM, is its own), one after the other in
one run, on the same random batch of 4 x 128 tokens, fp32, CPU, one thread:

  adamw        torch.optim.AdamW over all parameters (full fine-tuning)
  galore       peftkit GaLoreAdamW, r=64 on every trainable 2-D weight (embedding included), rest AdamW
  galore_gram  the same with svd="gram" (P from eigenvectors of the smaller Gram matrix, not the thin SVD)
  natural      the same as galore with natural=True (s=20, λ=1e-3), timed with a full history of s rows
               (the count is set to s after step 0, so steps 1.. cost what they cost after s steps)
  galore_torch galore-torch 1.0's GaLoreAdamW with the same param groups (r=64, T, α, proj_type "std")

Per row: optimizer state bytes (every tensor in `optimizer.state`), peak memory above the loaded model
(VmHWM after a reset, minus VmRSS then; glibc is told to mmap blocks over 64 KiB so freed memory leaves
RSS and each peak is seen), and per-step wall and CPU time of forward+backward and of `optimizer.step`.
Step 0 holds the SVD (P refresh) for the GaLore rows; "steady" is the median of the later steps, and
"amortised" adds (step-0 optimizer time - steady optimizer time) / T, the SVD's share at refresh gap T.

    .venv/bin/python benchmarks/bench_galore.py                     # 5 steps, T=200, 1 round
    .venv/bin/python benchmarks/bench_galore.py --steps 4 --rounds 2 --out /tmp/galore.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("adamw", "galore", "galore_gram", "natural", "galore_torch")


def _status(field: str) -> float:
    """VmRSS / VmHWM of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _optimizer(name: str, model, args):
    import torch

    from peftkit.optim import GaLoreAdamW, galore_param_groups

    common = {"rank": args.rank, "update_proj_gap": args.gap, "scale": 0.25}
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if name in ("galore", "galore_gram", "natural"):
        groups = galore_param_groups(model, **common, natural=name == "natural",
                                     svd="gram" if name == "galore_gram" else "svd")
        return GaLoreAdamW(groups, lr=args.lr, weight_decay=0.0)
    import galore_torch

    groups = galore_param_groups(model, **common, proj_type="std")
    groups[1].pop("rank")  # galore-torch projects every group that has the key
    return galore_torch.GaLoreAdamW(groups, lr=args.lr, weight_decay=0.0, no_deprecation_warning=True)


def _state_bytes(opt) -> int:
    import torch

    # galore-torch keeps P inside a GaLoreProjector object in the state: count its tensor too
    values = [getattr(v, "ortho_matrix", v) for s in opt.state.values() for v in s.values()]
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def job(name: str, args) -> dict:
    """One row: load the model, build the optimizer, `args.steps` timed steps, report in a dict."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.train.assets import smollm2_path

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak below is training's own
    base = _status("VmRSS")
    opt = _optimizer(name, model, args)
    steps = []
    for _ in range(args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        mid_wall, mid_cpu = time.perf_counter(), time.process_time()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end_wall, end_cpu = time.perf_counter(), time.process_time()
        if name == "natural" and not steps:  # time steps 1.. at the full history of s rows
            for state in opt.state.values():
                if "history_count" in state:
                    state["history_count"] = state["history"].shape[0]
        steps.append({"fb_wall": mid_wall - wall, "fb_cpu": mid_cpu - cpu, "opt_wall": end_wall - mid_wall,
                      "opt_cpu": end_cpu - mid_cpu, "loss": loss.item()})
    out = {"row": name, "state_bytes": _state_bytes(opt), "peak_mb": _status("VmHWM") - base,
           "params": sum(p.numel() for p in model.parameters()), "steps": steps}
    if name == "galore_gram":  # untimed, after the peak: how close the Gram basis is to the SVD's
        model(input_ids=tokens, labels=tokens).loss.backward()
        out["subspace_overlap"] = _subspace_overlap(model, args.rank)
    return out


def _subspace_overlap(model, rank: int) -> dict:
    """‖P_gram P_svdᵀ‖²_F / r over the 2-D gradients (1: the same subspace): min, mean, and seconds of each."""

    from peftkit.optim.projection import orthogonal_basis, projection_side

    overlaps, seconds = [], {"svd": 0.0, "gram": 0.0}
    for p in model.parameters():
        if p.grad is None or p.dim() != 2:
            continue
        side = projection_side(p.shape, "std")
        bases = {}
        for method in ("svd", "gram"):
            start = time.process_time()
            bases[method] = orthogonal_basis(p.grad, rank, side, method)
            seconds[method] += time.process_time() - start
        a, b = bases["svd"].double(), bases["gram"].double()
        cross = a @ b.T if side == "right" else a.T @ b  # (r, r)
        overlaps.append((cross.pow(2).sum() / min(rank, *p.shape)).item())
    return {"min": min(overlaps), "mean": sum(overlaps) / len(overlaps), "n": len(overlaps), **seconds}


def summarise(result: dict, gap: int) -> dict:
    """Steady (median of steps 1..) and amortised (SVD share 1/T) step times from one row's steps."""
    later = result["steps"][1:]
    out = {}
    for clock in ("wall", "cpu"):
        fb = statistics.median(s[f"fb_{clock}"] for s in later)
        opt = statistics.median(s[f"opt_{clock}"] for s in later)
        refresh = max(result["steps"][0][f"opt_{clock}"] - opt, 0.0)
        out[clock] = {"fb": fb, "opt": opt, "step": fb + opt, "first_opt": result["steps"][0][f"opt_{clock}"],
                      "amortised": fb + opt + refresh / gap}
    return out


def table(results: list[dict], gap: int) -> str:
    """Markdown: each row's figures and its ratios to the AdamW row of the same round (CPU-time clock)."""
    lines = ["| round | row | state MB | state / AdamW | peak MB | opt step s (cpu) | step 0 opt s | "
             "step s amortised (cpu) | step / AdamW | step / galore-torch | wall step s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted({x["round"] for x in results}):
        rows = {x["row"]: x for x in results if x["round"] == r}
        ref = summarise(rows["adamw"], gap)["cpu"]["amortised"]
        theirs = summarise(rows["galore_torch"], gap)["cpu"]["amortised"] if "galore_torch" in rows else None
        for name, x in rows.items():
            s = summarise(x, gap)
            vs_theirs = f"{s['cpu']['amortised'] / theirs:.3f}x" if theirs else "-"
            lines.append(
                f"| {r} | {name} | {x['state_bytes'] / 2**20:.0f} | "
                f"{x['state_bytes'] / rows['adamw']['state_bytes']:.3f}x | {x['peak_mb']:.0f} | "
                f"{s['cpu']['opt']:.3f} | {s['cpu']['first_opt']:.2f} | {s['cpu']['amortised']:.2f} | "
                f"{s['cpu']['amortised'] / ref:.3f}x | {vs_theirs} | {s['wall']['amortised']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (step 0 refreshes P)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--gap", type=int, default=200, help="T, steps between projection refreshes")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=1, help="repeat all rows, in order, this many times")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--out", type=Path, default=None, help="write the raw results as JSON here")
    parser.add_argument("--job", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print("RESULT " + json.dumps(job(args.job, args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    results = []
    for r in range(args.rounds):
        for name in args.rows:
            cmd = [sys.executable, __file__, "--job", name, "--steps", str(args.steps), "--rank", str(args.rank),
                   "--gap", str(args.gap), "--lr", str(args.lr)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            results.append({**result, "round": r})
            print(f"round {r} {name}: {json.dumps(summarise(result, args.gap)['cpu'])}", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(f"SmolLM2-135M fp32, batch 4 x 128, 1 thread, {args.steps} steps per row, r={args.rank}, T={args.gap}")
    print(table(results, args.gap))
    for x in results:
        if "subspace_overlap" in x:
            print(f"round {x['round']} svd=\"gram\" vs \"svd\" bases: {json.dumps(x['subspace_overlap'])}")


if __name__ == "__main__":
    main()
