"""Peak training memory and step time of LISA and IST next to LoRA and full fine-tuning (issue 16).

Model: SmolLM2-135M-Instruct (the cached plain checkpoint of `peftkit.train.assets.smollm2_path`, fp32, 30
blocks, embedding tied to the head), CPU, 1 torch thread, batch 4 x 128 random tokens, AdamW lr 1e-5. Jobs:

    full       AdamW over every parameter
    lora16     peftkit LoRA r16 (alpha 32) on the 7 linear layers of every block, AdamW
    lisa2      LISA gamma=2, period 2 (so the timed steps cross two draws; the embedding/head trains)
    lisa2-noemb  the same with the (tied) embedding frozen by hand: where LISA's memory above LoRA goes
    ist-lora16 IST over LoRA r16 (N_u = 7 of 30 blocks), score update every 4 steps on a 4 x 128 batch

Each job runs in its own fresh interpreter, so its memory is its own. After the model is loaded and the
optimizer built, the process's peak RSS is reset (`echo 5 > /proc/self/clear_refs`), so the peak is that of
training, not of loading; `peak_mb` is VmHWM after the steps and `over_model_mb` is that minus the RSS just
before the first step (weights and the Python/torch runtime). Steps: `--warmup` untimed, then `--steps`
timed; the median wall and CPU time per step are reported (IST's score-update step separately).

    .venv/bin/python benchmarks/bench_lisa.py                   # all jobs, 1 + 4 steps each (~4 min)
    .venv/bin/python benchmarks/bench_lisa.py --jobs lisa2 lora16 --steps 2
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
JOBS = ("full", "lora16", "lisa2", "lisa2-noemb", "ist-lora16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def setup(job: str, batch: dict):
    """Model, optimizer and schedule (or None) of one job."""
    import torch
    from transformers import AutoModelForCausalLM

    import peftkit
    from peftkit.schedules.ist import IST
    from peftkit.schedules.lisa import LISA
    from peftkit.train.assets import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).train()
    schedule = None
    if job.startswith("lisa"):
        schedule = LISA(model, gamma=2, period=2, seed=0)
        if job == "lisa2-noemb":
            model.get_input_embeddings().weight.requires_grad_(False)  # tied: the head too
        params = schedule.parameters()
    elif job in ("lora16", "ist-lora16"):
        peftkit.apply(model, peftkit.LoRAConfig(r=16, alpha=32, targets=TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
        if job == "ist-lora16":
            schedule = IST(model, update_interval=4, eval_batch=batch, seed=0)
    else:
        params = list(model.parameters())
    return model, torch.optim.AdamW(params, lr=1e-5), schedule


def run_job(job: str, warmup: int, steps: int, batch_size: int, seq: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (batch_size, seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    model, optimizer, schedule = setup(job, batch)
    run = timed_steps(model, batch, optimizer, schedule, warmup, steps)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"job": job, **run, "optimizer_state_mb": state / 2**20, "trainable_now": trainable}
    if job == "ist-lora16":  # step 4 ran the score update (3 forwards on the held-out batch)
        update = [i for i, s in enumerate(range(warmup + 1, warmup + steps + 1)) if s % 4 == 0]
        out["update_step_s"] = [run["step_s"][i] for i in update]
        out["plain_step_s"] = [w for i, w in enumerate(run["step_s"]) if i not in update]
        out["scores"] = schedule.scores.tolist()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=str(HERE / "results" / "lisa-ist.json"))
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    args = p.parse_args(argv)
    if args.job:
        print(json.dumps(run_job(args.job, args.warmup, args.steps, args.batch, args.seq)))
        return
    results = []
    for job in args.jobs:
        cmd = [sys.executable, __file__, "--job", job, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        r = results[-1]
        print(f"{job:12s} peak {r['peak_mb']:7.0f} MB  over model {r['over_model_mb']:6.0f} MB  "
              f"state {r['optimizer_state_mb']:6.0f} MB  step {statistics.median(r['step_s']):5.2f} s "
              f"(cpu {statistics.median(r['cpu_s']):5.2f} s)", flush=True)
    by = {r["job"]: r for r in results}
    if "lisa2" in by and "lora16" in by:
        print(f"LISA peak / LoRA peak: {by['lisa2']['peak_mb'] / by['lora16']['peak_mb']:.3f} "
              f"(target <= 1.10)")
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
