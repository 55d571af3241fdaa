"""Paired training-step timing: the floor and every library's model of one configuration in ONE process,
one step each per cycle in a shuffled order, ratios taken within the cycle; run inside a worker (worker.py).

Why, next to the protocol's one-process-per-job figures: on the 2-core VM the benchmarks were measured
on, the same job in fresh processes varied by 5-15% with nothing else running (CPU/wall 1.99), and
one process's step time wanders by as much from step to step. Jobs run minutes apart see different
machines; steps a second apart see nearly the same one, so a per-cycle ratio cancels most of that
drift, and the spread of the ratios over cycles says how far the median can be trusted. Peak memory
is not measured here (several models share the process); the protocol jobs measure it.
"""

from __future__ import annotations

import random
import statistics

from protocol import CONFIGS
from worker import PerStepWork, adapt, autocast, build_model, make_batch, timed


class Trainer:
    """One variant (library, configuration): its own model, AdamW and per-step schedule work."""

    def __init__(self, spec: dict, lib: str, config: str) -> None:
        import torch

        run = {**spec, "lib": lib, "config": config}
        self.model = adapt(build_model(run), run)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        self.work = PerStepWork(self.model, lib)
        self.ids = make_batch(run, self.model.config.vocab_size)
        self.spec = spec

    def step(self) -> None:
        with autocast(self.spec):
            loss = self.work.loss(self.model(input_ids=self.ids, labels=self.ids).loss)
        loss.backward()
        self.work.after_backward(self.opt)
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def quartiles(values: list[float]) -> list[float]:
    """[25th, 75th] percentile (the values themselves when there are fewer than two)."""
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def paired_job(spec: dict) -> dict:
    """`warmup` + `steps` cycles; per variant its step times, per library its per-cycle ratios to the
    floor (and peftkit's to peft's), with medians and quartiles."""
    variants = {"floor": Trainer(spec, "torch", "floor")}
    for lib in CONFIGS[spec["config"]][1]:
        variants[lib] = Trainer(spec, lib, spec["config"])
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_util: list[float] = []
    for cycle in range(spec["warmup"] + spec["steps"]):
        order = list(variants)
        random.Random(cycle).shuffle(order)
        for v in order:
            cpu: list[float] = []
            ms = timed(variants[v].step, spec["device"], cpu)
            if cycle >= spec["warmup"]:
                times[v].append(ms)
                cpu_util.append(cpu[0] / ms)
    ratios = {v: [t / f for t, f in zip(times[v], times["floor"], strict=True)] for v in variants if v != "floor"}
    if "peftkit" in times and "peft" in times:
        ratios["peftkit/peft"] = [a / b for a, b in zip(times["peftkit"], times["peft"], strict=True)]
    return {"step_ms": {v: statistics.median(t) for v, t in times.items()}, "step_ms_all": times,
            "ratios": ratios, "ratio_median": {k: statistics.median(r) for k, r in ratios.items()},
            "ratio_quartiles": {k: quartiles(r) for k, r in ratios.items()},
            "cpu_util": statistics.median(cpu_util)}
