"""The timed training loop the memory-saving benchmarks share (bench_lisa.py, bench_mgpo.py): a user's
step (forward, backward, the schedule's step, optimizer step), with the process's peak RSS counter restarted
after loading so that VmHWM measures training only."""

from __future__ import annotations

import gc
import time
from pathlib import Path


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def timed_steps(model, batch: dict, optimizer, schedule, warmup: int, steps: int) -> dict:
    """Run `warmup + steps` training steps; wall and CPU seconds of the timed ones, every loss, and the peak
    RSS (and RSS before the steps) in MB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak RSS counter: loading is not training
    rss0 = status_mb("VmRSS")
    wall, cpu, losses = [], [], []
    for step in range(1, warmup + steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        if schedule is not None:
            schedule.step(step, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        losses.append(loss.item())
    peak = status_mb("VmHWM")
    return {"peak_mb": peak, "rss_before_steps_mb": rss0, "over_model_mb": peak - rss0, "step_s": wall,
            "cpu_s": cpu, "losses": losses}
