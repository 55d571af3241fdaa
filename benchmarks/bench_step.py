"""Training-step time, peak memory and inference cost of peftkit, side by side with Hugging Face peft.

    python benchmarks/bench_step.py                 # full protocol (3 rounds x 10 steps), ~20 min on 2 cores
    python benchmarks/bench_step.py --quick         # smoke test: 1 round, 2 + 3 steps, seq 64
    python benchmarks/bench_step.py --device cuda --model-size 1b

The protocol is the one of `shared/reference/peft-baseline.md`: a random-init Llama (16.77M parameters),
fp32, batch 4 x 256, 2 torch threads. Every (library, configuration) runs in its own fresh subprocess
(this script with `--worker`, printing one JSON line), so peak memory (VmHWM) belongs to that job alone.
Rounds run every job once in a shuffled order; medians over rounds are reported, and ratios are taken
within a round (a job against the floor or the peft job of the same round) before the median, so slow
drift of the machine's load cancels. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = "BENCH_RESULT "
"""A CPU job whose CPU time / wall time is below this share of its threads lost a core to another process."""
from protocol import (  # noqa: E402,F401
    CONFIGS,
    INFER_VARIANTS,
    MODEL_SIZES,
    UNCONTENDED,
    PerStepWork,
    model_size_for,
    peft_config,
    peftkit_config,
)
from report import environment, write_report  # noqa: E402


# ============================================================================================
# worker side: one job in a fresh process
# ============================================================================================
def build_model(spec: dict):
    """The seeded random-init Llama of the protocol, on the job's device (fp32 weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec["seed"])
    with torch.device(spec["device"]):
        model = LlamaForCausalLM(LlamaConfig(**MODEL_SIZES[spec["model_size"]]))
    return model


def adapt(model, lib: str, config: str, total_steps: int = 0, seq: int = 256):
    """Apply `config` with `lib` ("torch" for the references); returns the model to train."""
    if lib == "torch":
        for p in model.parameters():
            p.requires_grad_(config == "full")
        if config == "floor":  # gradients reach the input embeddings' output; no weight gets one
            model.enable_input_require_grads()
        return model
    if lib == "peftkit":
        import peftkit

        return peftkit.apply(model, peftkit_config(config, total_steps, seq, model.config.to_dict()))
    import peft

    return peft.get_peft_model(model, peft_config(config, total_steps, seq, model.config.to_dict()))


def resident_mb(field: str = "VmRSS") -> float:
    """VmRSS / VmHWM of this process in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_mark(device: str) -> float:
    """Memory in use now (RSS on CPU, allocated on CUDA), MB."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return resident_mb("VmRSS")


def memory_peak(device: str) -> float:
    """Peak memory of the job so far (VmHWM on CPU, max allocated on CUDA), MB."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resident_mb("VmHWM")


def autocast(device: str):
    """bf16 autocast on CUDA; nothing on CPU (the CPU protocol is fp32)."""
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


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


def train_job(spec: dict) -> dict:
    """Warm-up + timed training steps of one (library, config); step times and peak memory."""
    import torch

    base = build_model(spec)
    n_base = sum(p.numel() for p in base.parameters())
    mem0 = memory_mark(spec["device"])
    total_steps = spec["warmup"] + spec["steps"]
    model = adapt(base, spec["lib"], spec["config"], total_steps, spec["seq"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = make_batch(spec, base.config.vocab_size)
    work = PerStepWork(model, spec["lib"])

    def step() -> None:
        with autocast(spec["device"]):
            loss = work.loss(model(input_ids=ids, labels=ids).loss)
        loss.backward()
        work.after_backward(opt)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    cpu: list[float] = []
    times = [timed(step, spec["device"], cpu) for _ in range(spec["warmup"] + spec["steps"])][spec["warmup"]:]
    return {"step_ms": statistics.median(times), "step_ms_all": times,
            "cpu_util": statistics.median(c / t for c, t in zip(cpu[spec["warmup"]:], times, strict=True)),
            "peak_delta_mb": memory_peak(spec["device"]) - mem0,
            "trainable": sum(p.numel() for p in params), "base_params": n_base}


class InferenceStates:
    """One LoRA r16 model (B drawn at random, so merging changes the weights) put into each variant.

    All three variants run on the same weight tensors, so the comparison is free of the few-percent
    differences that separately built, identical models show on CPU (where their memory lands):
    "base" swaps every adapter layer in its parent for its base layer (no wrapper left; the weights
    hold the merged values, which cost the same), "lora16-merged" is `peftkit.merge` / peft's
    `merge_adapter()` (both keep their layers, so the adapter can be unmerged), "lora16-unmerged" the
    adapter as trained. Switching happens between timed forwards.
    """

    def __init__(self, spec: dict) -> None:
        import torch

        self.lib = spec["lib"]
        self.model = adapt(build_model(spec), self.lib, "lora16-all").eval()
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        self.plain = self.model if self.lib == "peftkit" else self.model.get_base_model()
        base_attr = "base" if self.lib == "peftkit" else "base_layer"
        self.swaps = [(parent, name, child, getattr(child, base_attr))
                      for parent in list(self.plain.modules()) for name, child in parent.named_children()
                      if hasattr(child, base_attr) and hasattr(child, "merge")]
        self.merged = False

    def set_merged(self, merged: bool) -> None:
        if merged == self.merged:
            return
        import peftkit

        if self.lib == "peftkit":
            (peftkit.merge if merged else peftkit.unmerge)(self.model)
        else:
            self.model.merge_adapter() if merged else self.model.unmerge_adapter()
        self.merged = merged

    def model_for(self, variant: str):
        """The module to call for `variant`, after putting the weights and wrappers in place."""
        for parent, name, wrapper, _ in self.swaps:  # wrappers back first: merge/unmerge look for them
            setattr(parent, name, wrapper)
        self.set_merged(variant != "lora16-unmerged")
        if variant == "base":
            for parent, name, _, base in self.swaps:
                setattr(parent, name, base)
        return self.plain if variant == "base" else self.model


def infer_job(spec: dict) -> dict:
    """Forward-only (no grad) time of base / LoRA unmerged / LoRA merged, interleaved on one model."""
    import torch

    states = InferenceStates(spec)
    ids = make_batch(spec, states.plain.config.vocab_size)
    logits = {}
    times: dict[str, list[float]] = {k: [] for k in INFER_VARIANTS}

    def forward(model, name: str) -> None:
        with torch.no_grad(), autocast(spec["device"]):
            logits[name] = model(input_ids=ids, use_cache=False).logits

    order, cpu, wall = list(INFER_VARIANTS), [], []
    for i in range(spec["warmup"] + spec["steps"]):
        order = order[1:] + order[:1]  # rotate, so no variant always runs first
        for name in order:
            model = states.model_for(name)
            t = timed(lambda model=model, name=name: forward(model, name), spec["device"], cpu)
            wall.append(t)
            if i >= spec["warmup"]:
                times[name].append(t)
    diff = (logits["lora16-merged"].float() - logits["lora16-unmerged"].float()).abs().max().item()
    return {"forward_ms": {k: statistics.median(v) for k, v in times.items()}, "forward_ms_all": times,
            "cpu_util": statistics.median(c / t for c, t in zip(cpu, wall, strict=True)),
            "merged_vs_unmerged_max_abs_logit_diff": diff}


def file_job(spec: dict) -> dict:
    """Adapter file overhead of LoRA r16 all-linear: file bytes minus raw tensor bytes (both libraries)."""
    import peft

    import peftkit

    with tempfile.TemporaryDirectory() as tmp:
        path = peftkit.save(peftkit.apply(build_model(spec), peftkit_config("lora16-all")), Path(tmp) / "peftkit")
        out = {"peftkit": _file_sizes(path / "adapter.safetensors", path / "peftkit_adapter.json")}
        out["peftkit"]["json_text"] = (path / "peftkit_adapter.json").read_text()
        peft.get_peft_model(build_model(spec), peft_config("lora16-all")).save_pretrained(Path(tmp) / "peft")
        path = Path(tmp) / "peft"
        out["peft"] = _file_sizes(path / "adapter_model.safetensors", path / "adapter_config.json")
    return out


def _file_sizes(weights: Path, config: Path) -> dict:
    """Sizes of an adapter's two files; overhead = bytes beyond the raw tensor data."""
    from safetensors.torch import load_file

    tensor_bytes = sum(t.numel() * t.element_size() for t in load_file(str(weights)).values())
    st, js = weights.stat().st_size, config.stat().st_size
    return {"tensor_bytes": tensor_bytes, "safetensors_bytes": st, "json_bytes": js,
            "safetensors_overhead": st - tensor_bytes, "total_overhead": st - tensor_bytes + js}


def worker(spec: dict) -> None:
    import torch

    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    job = {"train": train_job, "infer": infer_job, "file": file_job}[spec["kind"]]
    loadavg = os.getloadavg()[0]  # other processes on the machine: read next to noisy numbers
    result = {**spec, **job(spec), "loadavg_1min": loadavg}
    print(MARK + json.dumps(result), flush=True)


# ============================================================================================
# driver side: rounds of subprocesses, aggregation, report
# ============================================================================================
def run_job(spec: dict) -> dict:
    """Run one job in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"job {spec} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def run_uncontended(spec: dict, retries: int) -> dict:
    """run_job, repeated (after a pause) while another process took CPU from it: on an idle machine a
    job's CPU time / wall time is ~its thread count (1.98-1.99 with 2 threads); under contention
    it falls (1.25 next to one busy process, at 3x the step time). The best attempt is kept."""
    best = None
    for attempt in range(retries + 1):
        res = run_job(spec)
        res["attempts"] = attempt + 1
        if best is None or res["cpu_util"] > best["cpu_util"]:
            best = res
        if spec["device"] != "cpu" or res["cpu_util"] >= UNCONTENDED * spec["threads"]:
            return best
        print(f"  contended (CPU/wall {res['cpu_util']:.2f} with {spec['threads']} threads, "
              f"load {res['loadavg_1min']:.1f}); retrying in {min(15 * 2**attempt, 120)} s", flush=True)
        time.sleep(min(15 * 2**attempt, 120))
    best["contended"] = True
    return best


def job_specs(args) -> list[dict]:
    common = {"device": args.device, "model_size": args.model_size, "seed": 0, "batch": args.batch,
              "seq": args.seq, "threads": args.threads}
    train = {**common, "kind": "train", "warmup": args.warmup, "steps": args.steps}
    specs = [{**train, "lib": lib, "config": c, "model_size": model_size_for(c, args.model_size)}
             for c in args.configs for lib in CONFIGS[c][1]]
    sizes = {s["model_size"] for s in specs}  # each model size its own floor: ratios stay within a size
    specs += [{**train, "lib": "torch", "config": "floor", "model_size": size} for size in sorted(sizes)
              if not any(s["config"] == "floor" and s["model_size"] == size for s in specs)]
    if args.infer:
        infer = {**common, "kind": "infer", "warmup": args.warmup, "steps": args.infer_steps}
        specs += [{**infer, "lib": lib} for lib in ("peft", "peftkit")]
    return specs


def run_rounds(args) -> list[list[dict]]:
    """Every job once per round, in a shuffled order (seeded by the round number)."""
    rounds = []
    for r in range(args.rounds):
        specs = job_specs(args)
        random.Random(r).shuffle(specs)
        results = []
        for i, spec in enumerate(specs):
            t0 = time.time()
            res = run_uncontended({**spec, "round": r}, args.retries)
            results.append(res)
            what = res.get("config", "inference")
            print(f"round {r + 1}/{args.rounds} job {i + 1}/{len(specs)}: {res['lib']:8s} {what:12s} "
                  f"{_job_summary(res)} ({time.time() - t0:.0f} s)", flush=True)
        rounds.append(results)
    return rounds


def _job_summary(res: dict) -> str:
    if res["kind"] == "train":
        return f"{res['step_ms']:8.1f} ms/step, peak +{res['peak_delta_mb']:.0f} MB"
    return " ".join(f"{k} {v:.1f} ms" for k, v in res["forward_ms"].items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per job")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--infer-steps", type=int, default=20, help="timed forwards per inference variant")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="training configurations (floor is always added)")
    p.add_argument("--retries", type=int, default=4, help="repeats of a CPU job that lost a core to another process")
    p.add_argument("--no-infer", dest="infer", action="store_false", help="skip the inference jobs")
    p.add_argument("--no-file", dest="file", action="store_false", help="skip the adapter file size")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round, 2 + 3 steps, seq 64")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model-size", choices=list(MODEL_SIZES), default="small")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.steps, args.infer_steps, args.seq = 1, 2, 3, 3, 64
    if "floor" not in args.configs:
        args.configs = ["floor", *args.configs]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    env = environment(args)
    file_result = None
    if args.file:
        spec = {"kind": "file", "lib": "peftkit", "device": "cpu", "model_size": "small", "seed": 0,
                "threads": args.threads}
        file_result = {k: v for k, v in run_job(spec).items() if k in ("peftkit", "peft")}
    rounds = run_rounds(args)
    path = write_report(args, rounds, env, file_result)
    print(path.read_text())


if __name__ == "__main__":
    main()
