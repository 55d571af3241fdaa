"""Peak training memory and step time of the memory-saving trainers on the peft-baseline model (issue 16).

    .venv/bin/python benchmarks/bench_memory_saving.py [--steps 10] [--rounds 2] [--out results/x.json]

The model and batch of `shared/reference/peft-baseline.md` (random-init Llama, 16.77M parameters, fp32,
batch 4 x 256). Every job runs in its own process (peak memory = VmHWM of that process alone), 3 warm-up +
`--steps` timed steps, rounds in alternating order; reported as ratios to AdamW full fine-tuning and to
LoRA r16 of the same run (medians over rounds). A step is what a user's loop does: forward + backward +
optimizer step (+ the schedule's step), or MeZO's two forward passes. SmolLM2-135M figures of the same
trainers are in bench_galore.py, bench_mezo.py, bench_lisa.py and bench_mgpo.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

JOBS = ("adamw-full", "lora16", "galore64", "natural-galore64", "mezo-full", "mezo-lora16", "sparse-mezo",
        "lisa2", "ist-lora16", "mgpo-lora16", "inference")
MODEL = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=6, vocab_size=8000, tie_word_embeddings=False)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _trainer(job: str, model, batch):
    """(one training step as a closure, what it trains) for `job` on a fresh model."""
    import torch

    import peftkit
    from peftkit.optim import GaLoreAdamW, MeZO, galore_param_groups
    from peftkit.schedules import IST, LISA, MGPO

    if job.endswith("lora16"):
        peftkit.apply(model, peftkit.LoRAConfig(r=16, alpha=32, targets=LINEAR))
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = lambda: model(**batch).loss  # noqa: E731
    if job.startswith(("mezo", "sparse-mezo")):
        model.eval()
        opt = MeZO(trainable, lr=1e-6, eps=1e-3, sparsity=0.8 if job == "sparse-mezo" else 0.0)
        return lambda n: opt.step(loss)
    if job == "inference":
        return lambda n: torch.no_grad()(loss)()
    schedule, opt = None, None
    if job.startswith(("galore", "natural")):
        groups = galore_param_groups(model, rank=64, update_proj_gap=200, scale=0.25, natural=job.startswith("nat"))
        opt = GaLoreAdamW(groups, lr=1e-4)
    elif job == "lisa2":
        schedule = LISA(model, gamma=2, period=20)
        opt = torch.optim.AdamW(schedule.parameters(), lr=1e-4)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        if job == "ist-lora16":
            schedule = IST(model, num_update=2, eval_batch=batch)
        elif job == "mgpo-lora16":
            schedule = MGPO(model, opt, rho=0.01, beta=0.8)

    def step(n: int) -> None:
        loss().backward()
        if schedule is not None:
            schedule.step(n, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_job(job: str, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    ids = torch.randint(0, MODEL["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(0))
    step = _trainer(job, model, {"input_ids": ids, "labels": ids})
    for n in range(1, 4):
        step(n)
    times = []
    for n in range(4, 4 + steps):
        start = time.perf_counter()
        step(n)
        times.append(time.perf_counter() - start)
    return {"job": job, "step_s": statistics.median(times), "peak_mb": _peak_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    parser.add_argument("--out", default="benchmarks/results/memory_saving_baseline_model.json")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    args = parser.parse_args()
    if args.job:
        print("RESULT " + json.dumps(run_job(args.job, args.steps)))
        return
    found: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for job in (args.jobs if r % 2 == 0 else list(reversed(args.jobs))):
            out = subprocess.run([sys.executable, __file__, "--job", job, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            found.setdefault(job, []).append(json.loads(out.split("RESULT ", 1)[1]))
            print(job, found[job][-1], flush=True)
    rows = {j: {k: statistics.median(x[k] for x in v) for k in ("step_s", "peak_mb")} for j, v in found.items()}
    for name in ("adamw-full", "lora16"):
        if name in rows:
            for row in rows.values():
                row[f"step_vs_{name}"] = row["step_s"] / rows[name]["step_s"]
                row[f"peak_vs_{name}"] = row["peak_mb"] / rows[name]["peak_mb"]
    Path(args.out).write_text(json.dumps({"model": MODEL, "batch": [4, 256], "threads": 2, "steps": args.steps,
                                          "rounds": args.rounds, "rows": rows}, indent=1))
    print("| job | step s | peak MB | step / full FT | peak / full FT | step / LoRA r16 | peak / LoRA r16 |")
    for job, row in rows.items():
        print(f"| {job} | {row['step_s']:.3f} | {row['peak_mb']:.0f} | {row.get('step_vs_adamw-full', 0):.2f} | "
              f"{row.get('peak_vs_adamw-full', 0):.2f} | {row.get('step_vs_lora16', 0):.2f} | "
              f"{row.get('peak_vs_lora16', 0):.2f} |")


if __name__ == "__main__":
    main()
