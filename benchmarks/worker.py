"""One benchmark job in a fresh process: build the model, apply a configuration, time training steps.

    python benchmarks/worker.py '<json spec>'      # prints one line: BENCH_RESULT {...}

Run by runner.py (one subprocess per job, so that the peak memory, VmHWM, belongs to this job alone);
bench_step.py and scaling.py only write specs. A spec's keys: kind ("train", "paired", "infer", "file"), lib
("torch", "peft", "peftkit"), config (a protocol.CONFIGS name), device, dtype ("fp32" or "bf16"),
model_size (protocol.MODEL_SIZES) and optionally model (LlamaConfig keywords overriding the size's),
rank (overrides the configuration's rank), seed, batch, seq, threads, warmup, steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import MODEL_SIZES, peft_config, peftkit_config  # noqa: E402

MARK = "BENCH_RESULT "


def model_kwargs(spec: dict) -> dict:
    """LlamaConfig keyword arguments of the job's model: its size, with the spec's overrides."""
    return {**MODEL_SIZES[spec["model_size"]], **spec.get("model", {})}


def build_model(spec: dict):
    """The seeded random-init Llama of the protocol on the job's device; bf16 weights when dtype is bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec["seed"])
    with torch.device(spec["device"]):
        model = LlamaForCausalLM(LlamaConfig(**model_kwargs(spec)))
    return model.to(torch.bfloat16) if spec.get("dtype") == "bf16" else model


def adapt(model, spec: dict, config: str | None = None):
    """Apply the job's configuration (or `config`) with its library ("torch": the references); the model to train."""
    config = config or spec["config"]
    if spec["lib"] == "torch":
        for p in model.parameters():
            p.requires_grad_(config == "full")
        if config == "floor":  # gradients reach the input embeddings' output; no weight gets one
            model.enable_input_require_grads()
        return model
    context = {"total_steps": spec.get("warmup", 0) + spec.get("steps", 0), "seq": spec["seq"],
               "model": model_kwargs(spec), "rank": spec.get("rank")}
    if spec["lib"] == "peftkit":
        import peftkit

        return peftkit.apply(model, peftkit_config(config, **context))
    import peft

    return peft.get_peft_model(model, peft_config(config, **context))


def resident_mb(field: str = "VmRSS") -> float:
    """VmRSS / VmHWM of this process in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_mark(device: str) -> float:
    """Memory in use now (RSS on CPU, allocated on CUDA, whose peak counter restarts here), MB."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return resident_mb("VmRSS")


def memory_peak(device: str) -> float:
    """Peak memory of the job so far (VmHWM on CPU, torch.cuda.max_memory_allocated on CUDA), MB."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resident_mb("VmHWM")


def autocast(spec: dict):
    """bf16 autocast for bf16 jobs (fp32 adapter tensors then compute in bf16 too), nothing for fp32 ones.

    Keyed on the dtype, not the device: the GPU protocol's bf16 path (CUDA's default) then runs on CPU as
    well, which is how the test suite checks it on a machine without a GPU."""
    import torch

    if spec.get("dtype") == "bf16":
        return torch.autocast(spec["device"], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(fn, device: str, cpu: list[float] | None = None) -> float:
    """Wall time of fn() in ms (synchronised on CUDA); appends the process's CPU ms to `cpu` if given."""
    import torch

    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    if cpu is not None:
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return (time.perf_counter() - start) * 1e3


def make_batch(spec: dict, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=gen).to(spec["device"])


class PerStepWork:
    """What a user runs besides forward/backward/step for a method with a schedule: peftkit's
    `MethodSchedule` (regularizer in the loss, rank allocation after backward) or peft AdaLoRA's
    `update_and_allocate` (peft adds AdaLoRA's regularizer inside the forward itself)."""

    def __init__(self, model, lib: str) -> None:
        self.schedule, self.peft_allocate = None, None
        if lib == "peftkit":
            import peftkit

            self.schedule = peftkit.schedule_for(model) if peftkit.has_adapter(model) else None
        elif lib == "peft" and hasattr(getattr(model, "base_model", None), "update_and_allocate"):
            self.peft_allocate = model.base_model.update_and_allocate
        self.model, self.step = model, 0

    def loss(self, loss):
        term = self.schedule.extra_loss(self.model) if self.schedule is not None else None
        return loss if term is None else loss + term

    def after_backward(self, optimizer) -> None:
        self.step += 1
        if self.schedule is not None:
            self.schedule.on_after_backward(self.step, self.model, optimizer)
        if self.peft_allocate is not None:
            self.peft_allocate(self.step)


def train_job(spec: dict) -> dict:
    """Warm-up + timed training steps of one (library, config); step times and peak memory."""
    import torch

    base = build_model(spec)
    n_base = sum(p.numel() for p in base.parameters())
    mem0 = memory_mark(spec["device"])
    model = adapt(base, spec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = make_batch(spec, base.config.vocab_size)
    work = PerStepWork(model, spec["lib"])

    def step() -> None:
        with autocast(spec):
            loss = work.loss(model(input_ids=ids, labels=ids).loss)
        loss.backward()
        work.after_backward(opt)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    cpu: list[float] = []
    times = [timed(step, spec["device"], cpu) for _ in range(spec["warmup"])]
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [timed(step, spec["device"], cpu) for _ in range(spec["steps"])]
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / max(spec["steps"], 1)
    return {"step_ms": statistics.median(times), "step_ms_all": times, "page_faults_per_step": faults,
            "cpu_util": statistics.median(c / t for c, t in zip(cpu[spec["warmup"]:], times, strict=True)),
            "peak_delta_mb": memory_peak(spec["device"]) - mem0,
            "trainable": sum(p.numel() for p in params), "base_params": n_base}


def run(spec: dict) -> dict:
    """The job's result (the spec, its measurements and the load average at its start)."""
    import torch

    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    loadavg = os.getloadavg()[0]  # other processes on the machine: read next to noisy numbers
    if spec["kind"] == "train":
        out = train_job(spec)
    elif spec["kind"] == "paired":
        import paired

        out = paired.paired_job(spec)
    else:
        import inference

        out = {"infer": inference.infer_job, "file": inference.file_job}[spec["kind"]](spec)
    return {**spec, **out, "loadavg_1min": loadavg}


if __name__ == "__main__":
    print(MARK + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
