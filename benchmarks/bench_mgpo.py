"""Step time and peak training memory of LoRA-MGPO next to plain LoRA r16 (issue 16, methods.md §7.5).

Model: SmolLM2-135M-Instruct (the cached plain checkpoint of `peftkit.train.assets.smollm2_path`, fp32),
CPU, 1 torch thread, batch 4 x 128 random tokens, LoRA r16 (alpha 32) on the 7 linear layers of every
block, AdamW lr 1e-4. Jobs:

    lora16   plain LoRA
    mgpo16   the same with MGPO(rho=0.01, beta=0.8) (the paper's NLG profile): one forward/backward at
             W0 + ε + s B A per step, ε applied factored (rank 2r) by a forward hook on each LoRA layer

Each job runs in its own fresh interpreter (its memory is its own); the jobs alternate for `--rounds`
rounds, so a slow stretch of the shared machine hits both. Peak = VmHWM after the steps, its counter reset
(`/proc/self/clear_refs`) after loading; "over model" subtracts the RSS just before step 1. Step 1 is
untimed (and unperturbed: no momentum yet); the median wall / CPU time of the next `--steps` is reported.

    .venv/bin/python benchmarks/bench_mgpo.py                  # 2 rounds x 2 jobs, 1 + 4 steps (~4 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_steps import timed_steps  # noqa: E402

HERE = Path(__file__).resolve().parent
JOBS = ("lora16", "mgpo16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_job(job: str, warmup: int, steps: int, batch_size: int, seq: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import peftkit
    from peftkit.schedules.mgpo import MGPO
    from peftkit.train.assets import smollm2_path

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (batch_size, seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).train()
    peftkit.apply(model, peftkit.LoRAConfig(r=16, alpha=32, targets=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    schedule = MGPO(model, optimizer, rho=0.01, beta=0.8) if job == "mgpo16" else None
    run = timed_steps(model, batch, optimizer, schedule, warmup, steps)
    out = {"job": job, **run}
    if schedule is not None:
        out["gbar_mean"] = float(torch.stack(list(schedule.gbar.values())).mean())
        out["layers"] = len(schedule.layers)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=str(HERE / "results" / "mgpo.json"))
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    args = p.parse_args(argv)
    if args.job:
        print(json.dumps(run_job(args.job, args.warmup, args.steps, args.batch, args.seq)))
        return
    results = []
    for round_ in range(args.rounds):
        for job in JOBS:
            cmd = [sys.executable, __file__, "--job", job, "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = {**json.loads(line), "round": round_}
            results.append(r)
            print(f"round {round_} {job:7s} peak {r['peak_mb']:6.0f} MB  over model {r['over_model_mb']:6.0f} MB  "
                  f"step {statistics.median(r['step_s']):5.2f} s (cpu {statistics.median(r['cpu_s']):5.2f} s)  "
                  f"losses {[round(x, 3) for x in r['losses']]}", flush=True)
    for key in ("peak_mb", "over_model_mb"):
        ratios = [m[key] / lo[key] for lo, m in zip(results[::2], results[1::2], strict=True)]
        print(f"MGPO / LoRA {key}: {', '.join(f'{x:.3f}' for x in ratios)}")
    for key in ("step_s", "cpu_s"):
        ratios = [statistics.median(m[key]) / statistics.median(lo[key])
                  for lo, m in zip(results[::2], results[1::2], strict=True)]
        print(f"MGPO / LoRA median {key}: {', '.join(f'{x:.3f}' for x in ratios)}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
