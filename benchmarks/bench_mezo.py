"""Peak memory and step time of MeZO / Sparse MeZO next to inference and AdamW (issue 16, methods.md §7.1-7.2).

    python benchmarks/bench_mezo.py                       # all jobs, 1 warm-up + 3 timed steps each (~10 min)
    python benchmarks/bench_mezo.py --jobs infer mezo-full --steps 2
    python benchmarks/bench_mezo.py --restore             # lr-0 step on the real weights: entries not restored

Model: SmolLM2-135M-Instruct (`peftkit.train.assets.smollm2_path`, the cached plain checkpoint), fp32,
CPU, torch.set_num_threads(1); batch 4 x 128 random token ids (seed 0), labels = inputs. Each job runs
in its own subprocess so its peak memory (VmHWM, reset right after the model and the batch are built)
is its own; glibc is told to mmap blocks >= 64 KB so freed memory leaves the resident set at once.

Jobs: `infer` (forward only, no_grad, the loss computed: what MeZO runs twice a step), `mezo-full`
(MeZO on every parameter), `mezo-lora` (LoRA r16 on q,k,v,o,gate,up,down, MeZO on its parameters),
`sparse-mezo` (sparsity 0.8 on every parameter; the first step also computes the thresholds, which is
timed apart), `adamw-full` and `adamw-lora` (forward, backward, AdamW step). Reported per job: peak
RSS, peak minus the RSS before the first step (what the step itself adds above weights and batch),
and the median step time, wall and CPU (process time: less sensitive to other jobs on a shared machine);
ratios are taken against `infer` of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

MARK = "RESULT "
JOBS = ["infer", "mezo-full", "mezo-lora", "sparse-mezo", "adamw-full", "adamw-lora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status(field: str) -> float:
    """VmRSS / VmHWM of this process in MB."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _setup(name: str, batch: int, seq: int):
    """Model (fp32, eval), batch, and a `step()` that does one step of job `name` and returns the loss."""
    import torch
    from transformers import AutoModelForCausalLM

    import peftkit
    from peftkit.optim import MeZO
    from peftkit.train.assets import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    if name.endswith("lora"):
        peftkit.apply(model, peftkit.LoRAConfig(r=16, alpha=32, targets=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    if name == "infer":
        def step():
            with torch.no_grad():
                return float(loss())
    elif name.startswith("mezo") or name == "sparse-mezo":
        lr = 5e-5 if name == "mezo-lora" else 1e-6  # MeZO's defaults (methods.md §7.1)
        opt = MeZO(params, lr=lr, eps=1e-2 if name == "mezo-lora" else 1e-3,
                   sparsity=0.8 if name == "sparse-mezo" else 0.0)
        step = lambda: float(opt.step(loss))  # noqa: E731
    else:
        opt = torch.optim.AdamW(params, lr=1e-4 if name == "adamw-lora" else 1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            value = loss()
            value.backward()
            opt.step()
            return float(value)
    return model, params, step


def job(name: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, params, step = _setup(name, batch, seq)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak below is the steps' own
    rss = _status("VmRSS")
    times, cpu, losses = [], [], []
    for _ in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"job": name, "rss_before_mb": rss, "peak_mb": _status("VmHWM"), "extra_mb": _status("VmHWM") - rss,
            "first_step_s": times[0], "step_s": statistics.median(times[warmup:]), "times": times,
            "step_cpu_s": statistics.median(cpu[warmup:]), "cpu_times": cpu,
            "losses": losses, "trainable": sum(p.numel() for p in params),
            "params": sum(p.numel() for p in model.parameters()),
            "grads_allocated": any(p.grad is not None for p in model.parameters())}


def restore_job(batch: int, seq: int) -> dict:
    """One MeZO step with lr 0 on the real weights: how many entries do not come back bit for bit, by how much."""
    import torch

    from peftkit.optim import MeZO

    torch.set_num_threads(1)
    model, params, _ = _setup("infer", batch, seq)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in params]
    MeZO(params, lr=0.0, eps=1e-3).step(lambda: model(input_ids=ids, labels=ids).loss)
    params = [p.detach() for p in params]
    changed = sum(int((p != b).sum()) for p, b in zip(params, before, strict=True))
    # in units of the rounding scale: machine eps x max(|θ|, ε) (ε |z| is about ε)
    ulps = max(float(((p - b).abs() / torch.finfo(b.dtype).eps / b.abs().clamp_min(1e-3)).max())
               for p, b in zip(params, before, strict=True))
    worst = max(float((p - b).abs().max()) for p, b in zip(params, before, strict=True))
    return {"job": "restore", "entries": sum(p.numel() for p in params), "changed": changed,
            "changed_share": changed / sum(p.numel() for p in params), "max_abs_diff": worst,
            "max_diff_in_eps_max_theta_eps": ulps}


def run(jobs: list[str], args) -> list[dict]:
    results = []
    for name in jobs:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        cmd = [sys.executable, __file__, "--job", name, "--batch", str(args.batch), "--seq", str(args.seq),
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        if proc.returncode or not lines:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len(MARK):]))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("times", "losses")}), flush=True)
    return results


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["job"] == "infer"), None)
    lines = ["| job | trainable | peak RSS MB | x infer | step adds MB | step s (wall) | step s (CPU) | x infer fwd "
             "(CPU) | first step s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        mem = f"{r['peak_mb'] / base['peak_mb']:.3f}x" if base else "-"
        t = f"{r['step_cpu_s'] / base['step_cpu_s']:.2f}x" if base else "-"
        lines.append(f"| `{r['job']}` | {r['trainable'] / 1e6:.2f}M | {r['peak_mb']:.0f} | {mem} | {r['extra_mb']:.0f} "
                     f"| {r['step_s']:.2f} | {r['step_cpu_s']:.2f} | {t} | {r['first_step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", nargs="+", default=JOBS, choices=JOBS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--restore", action="store_true", help="only measure how exactly an lr-0 step restores θ")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/mezo.json")
    args = parser.parse_args()
    if args.job:
        print(MARK + json.dumps(job(args.job, args.batch, args.seq, args.warmup, args.steps)), flush=True)
        return
    if args.restore:
        print(json.dumps(restore_job(args.batch, args.seq)))
        return
    results = run(args.jobs, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                   "args": vars(args), "results": results}, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
