"""Mixed-adapter batches: forward time of a batch whose 8 samples each name another of 8 LoRA r16 adapters,
against the same batch with one adapter active; peftkit and peft's mixed-batch LoRA (`adapter_names=`).

Model: SmolLM2-135M's architecture (576 hidden, 30 layers), random weights, fp32, CPU; LoRA r16 on the 7
linear layers of every block (210 layers), the same random factors for both libraries. Batch: 8 samples
x `--seq` tokens, inference (no grad). Each library runs in its own fresh interpreter, alternating its
two configurations (one adapter / mixed) `--repeats` times after a warm-up; the figure is the fastest
call per configuration (on a shared machine the least disturbed one; medians are printed too) and the
ratio mixed / one adapter, with the lowest CPU time / wall time seen per configuration (below ~0.9 per
thread another process took the core during some call).

    .venv/bin/python benchmarks/bench_mixed.py                  # 128 tokens, 1 thread, 7 repeats
    .venv/bin/python benchmarks/bench_mixed.py --seq 32 --repeats 3 --size small   # a quick run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

from bench_combine import MARK, SIZES, TARGETS, _factors

N_ADAPTERS = 8


def _build(lib: str, size: str, r: int):
    """The model with N_ADAPTERS LoRA adapters "a0".."a7" holding the shared random factors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size])).eval()
    factors = _factors(model, N_ADAPTERS, r)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    if lib == "peft":
        import peft

        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
        model = peft.get_peft_model(model, cfg, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, cfg)
        model.eval()
        for i, name in enumerate(names):
            for module, (a, b) in factors[i].items():
                layer = model.base_model.model.get_submodule(module)
                layer.lora_A[name].weight.data.copy_(a)
                layer.lora_B[name].weight.data.copy_(b)
        return model, names, lambda name: model.set_adapter(name)
    import peftkit

    for i, name in enumerate(names):
        peftkit.apply(model, peftkit.LoRAConfig(r=r, alpha=2 * r, targets=TARGETS), name=name)
        state = peftkit.core.adapters.get_state(model, name)
        with torch.no_grad():
            for module, (a, b) in factors[i].items():
                state.layers[module].lora_A.copy_(a)
                state.layers[module].lora_B.copy_(b)
    return model, names, lambda name: peftkit.set_active(model, name)


def job(lib: str, size: str, r: int, seq: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model, names, activate = _build(lib, size, r)
    ids = torch.randint(0, 1000, (N_ADAPTERS, seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    activate(names[0])
    runs = {"one": lambda: model(**batch), "mixed": lambda: model(**batch, adapter_names=names)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    usage: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        one = runs["one"]().logits[0]
        mixed = runs["mixed"]().logits[0]  # warm-up, and sample 0 names the active adapter: same output
        assert torch.allclose(one, mixed, atol=1e-4), "sample 0 must equal the single-adapter run"
        for _ in range(repeats):
            for key, run in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                times[key].append(wall)
                usage[key].append(cpu / wall / threads)
    return {"lib": lib, **{f"{k}_s": min(v) for k, v in times.items()},
            **{f"{k}_median_s": statistics.median(v) for k, v in times.items()},
            **{f"{k}_cpu": round(min(v), 2) for k, v in usage.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="smollm2", choices=sorted(SIZES))
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(MARK + json.dumps(job(args.job, args.size, args.r, args.seq, args.repeats, args.threads)))
        return
    rows = []
    for lib in ("peftkit", "peft"):
        cmd = [sys.executable, __file__, "--job", lib, "--size", args.size, "--r", str(args.r), "--seq",
               str(args.seq), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith(MARK))[len(MARK):]))
    print(f"# {platform.processor() or platform.machine()}, {args.threads} thread(s), {args.size}, "
          f"{N_ADAPTERS} LoRA r{args.r} adapters, batch {N_ADAPTERS} x {args.seq} tokens, fp32, no grad")
    print("| library | one adapter (s) | mixed, 8 adapters (s) | mixed / one | medians: mixed / one | "
          "lowest CPU use one / mixed |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['lib']} | {row['one_s']:.3f} | {row['mixed_s']:.3f} | {row['mixed_s'] / row['one_s']:.2f}x "
              f"| {row['mixed_median_s'] / row['one_median_s']:.2f}x | {row['one_cpu']} / {row['mixed_cpu']} |")
    ours, theirs = rows
    print(f"\npeftkit mixed / peft mixed: {ours['mixed_s'] / theirs['mixed_s']:.2f}x")


if __name__ == "__main__":
    main()
