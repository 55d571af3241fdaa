"""`peftkit.combine` vs peft's `add_weighted_adapter`: 8 LoRA r16 all-linear adapters into one, per mode.

Model: SmolLM2-135M's architecture (576 hidden, 1536 MLP, 30 layers: 210 adapted linear layers),
random weights (combining reads the adapters only). Each (library, mode) runs in a fresh interpreter
with the 8 adapters already in memory (peft: one PeftModel holding them; peftkit: the 8 adapter values,
no model needed), and measures one call: wall time, CPU time / wall time (below ~0.9 per thread, another
process took the core) and peak extra memory (VmHWM, reset just before the call, minus VmRSS then;
glibc is told to mmap every block over 64 KiB, so freed memory leaves RSS and each peak is seen). The random modes
run at density 0.5; the svd modes at peft's default rank (16).

    .venv/bin/python benchmarks/bench_combine.py                   # all 11 modes, 2 rounds
    .venv/bin/python benchmarks/bench_combine.py --modes linear svd --rounds 1
    .venv/bin/python benchmarks/bench_combine.py --size small --rounds 1   # the 6-layer benchmark model
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

MODES = ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd",
         "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
SMALL = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=6, vocab_size=8000, tie_word_embeddings=False)
"""protocol.py's "small" benchmark model: 42 adapted layers, for a quick run (--size small)."""
SIZES = {"smollm2": SMOLLM2, "small": SMALL}
MARK = "RESULT "


def _status(field: str) -> float:
    """VmRSS / VmHWM of this process in MB."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _factors(model, n: int, r: int):
    """Random factors for n adapters, {adapter: {module name: (A, B)}}, the same for both libraries."""
    import torch

    g = torch.Generator().manual_seed(0)
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    return {i: {name: (torch.randn(r, model.get_submodule(name).in_features, generator=g) * 0.05,
                       torch.randn(model.get_submodule(name).out_features, r, generator=g) * 0.05)
                for name in names} for i in range(n)}


def job(lib: str, how: str, n: int, r: int, density: float, size: str = "smollm2") -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    with torch.device("meta"):  # module names and shapes only; peftkit's side never builds the model
        shapes = LlamaForCausalLM(LlamaConfig(**SIZES[size]))
    factors = _factors(shapes, n, r)
    options = {} if how in ("linear", "cat", "svd") else {"density": density}
    if lib == "peft":
        call = _peft_call(LlamaForCausalLM(LlamaConfig(**SIZES[size])).eval(), factors, r, how, options)
    else:
        call = _peftkit_call(factors, r, how, options)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak below is the call's own
    rss = _status("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"lib": lib, "how": how, "seconds": wall, "cpu_util": cpu / wall, "peak_mb": _status("VmHWM") - rss}


def _peft_call(model, factors, r, how, options):
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    model = get_peft_model(model, cfg, adapter_name="a0")
    for i in range(1, len(factors)):
        model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():
        for i, modules in factors.items():
            for name, (a, b) in modules.items():
                layer = model.base_model.model.get_submodule(name)
                layer.lora_A[f"a{i}"].weight.copy_(a)
                layer.lora_B[f"a{i}"].weight.copy_(b)
    names = [f"a{i}" for i in factors]
    return lambda: model.add_weighted_adapter(names, [1 / len(names)] * len(names), "merged",
                                              combination_type=how, **options)


def _peftkit_call(factors, r, how, options):
    import peftkit

    cfg = peftkit.LoRAConfig(r=r, alpha=2 * r, targets=TARGETS)
    values = [(cfg, {}, {k: v for name, (a, b) in modules.items()
                         for k, v in ((name + ".lora_A", a), (name + ".lora_B", b))}) for modules in factors.values()]
    return lambda: peftkit.combine(values, [1 / len(values)] * len(values), how, **options)


def run(modes: list[str], rounds: int, n: int, r: int, density: float, size: str) -> list[dict]:
    results = []
    for rnd in range(rounds):
        for how in modes:
            for lib in (("peft", "peftkit") if rnd % 2 == 0 else ("peftkit", "peft")):
                # large blocks always mmapped, so freed memory leaves RSS at once and VmHWM sees each peak
                env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
                args = [sys.executable, __file__, "--job", lib, how, "--n", str(n), "--r", str(r),
                        "--density", str(density), "--size", size]
                proc = subprocess.run(args, capture_output=True, text=True, env=env)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
                if proc.returncode or not lines:
                    raise RuntimeError(f"{lib} {how} failed:\n{proc.stderr[-2000:]}")
                results.append(json.loads(lines[-1][len(MARK):]))
                print(json.dumps(results[-1]), flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| mode | peft s | peftkit s | time ratio | peft peak MB | peftkit peak MB | memory ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for how in dict.fromkeys(r["how"] for r in results):
        med = {lib: {k: statistics.median(r[k] for r in results if r["lib"] == lib and r["how"] == how)
                     for k in ("seconds", "peak_mb")} for lib in ("peft", "peftkit")}
        p, k = med["peft"], med["peftkit"]
        lines.append(f"| `{how}` | {p['seconds']:.2f} | {k['seconds']:.3f} | {k['seconds'] / p['seconds']:.3f}x | "
                     f"{p['peak_mb']:.0f} | {k['peak_mb']:.0f} | {k['peak_mb'] / max(p['peak_mb'], 1):.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=8, help="adapters combined")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--size", default="smollm2", choices=SIZES)
    parser.add_argument("--job", nargs=2, metavar=("LIB", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/combine.json")
    args = parser.parse_args()
    if args.job:
        print(MARK + json.dumps(job(*args.job, args.n, args.r, args.density, args.size)), flush=True)
        return
    results = run(args.modes, args.rounds, args.n, args.r, args.density, args.size)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                   "args": vars(args), "results": results}, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
