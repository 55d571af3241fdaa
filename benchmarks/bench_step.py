"""Training-step time, peak memory and inference cost of peftkit, side by side with Hugging Face peft.

    python benchmarks/bench_step.py                  # the issue-5 suite at seq 256 and 1024, 3 rounds (CPU: ~4.7 h)
    python benchmarks/bench_step.py --quick          # smoke test: 1 round, 2 + 3 steps, seq 64
    python benchmarks/bench_step.py --suite issue4 --seq 256
    python benchmarks/bench_step.py --configs lora16-all dora8-all --seq 256 --rounds 5
    python benchmarks/bench_step.py --paired-only --rounds 1 --seq 256   # paired timing only (~15 min)
    python benchmarks/bench_step.py --device cuda    # bf16 weights + autocast on the 1.1B "1b" model

The protocol is the one of `shared/reference/peft-baseline.md`: a random-init Llama (16.77M parameters),
fp32, batch 4 x 256, 2 torch threads. Every (library, configuration, sequence length) runs in its own
fresh subprocess (worker.py, printing one JSON line), so peak memory (VmHWM) belongs to that job alone.
Rounds run every job once in a shuffled order; medians over rounds are reported, and ratios are taken
within a round (a job against the floor of the same model size and sequence length, or against the peft
job of the same round) before the median, so slow drift of the machine's load cancels. Inference is one
process per (library, configuration, sequence length) that times the base model, the adapter unmerged
and (where it merges) merged, interleaved on the same weights (inference.py). The paired timing job
(paired.py) holds the floor and each library's model of one configuration in one process and takes step
ratios within a cycle of one step each: a second, tighter estimate of x floor and x peft, whose spread
over cycles is reported. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from protocol import CONFIGS, MODEL_SIZES, NO_INFERENCE, SUITES, model_size_for  # noqa: E402
from report import environment, rerender, write_report  # noqa: E402
from runner import run_job, run_rounds  # noqa: E402


def paired_cycles_at(cycles: int, seq: int) -> int:
    """`cycles` up to sequence 256; longer steps get proportionally fewer, but at least min(cycles, 20).

    A step at 1024 tokens costs ~4x one at 256, and the job's time is what limits the suite.
    """
    return cycles if seq <= 256 else max(min(cycles, 20), cycles * 256 // seq)


def job_specs(args) -> list[dict]:
    """Training jobs per (config, library, seq), each model size's floor, and the inference jobs."""
    specs = []
    for seq in args.seq:
        common = {"device": args.device, "dtype": args.dtype, "seed": 0, "batch": args.batch, "seq": seq,
                  "threads": args.threads}
        train = {**common, "kind": "train", "warmup": args.warmup, "steps": args.steps}
        jobs = [] if args.paired_only else [
            {**train, "lib": lib, "config": c, "model_size": model_size_for(c, args.model_size)}
            for c in args.configs for lib in CONFIGS[c][1]]
        sizes = sorted({j["model_size"] for j in jobs})  # each model size its own floor: ratios stay within a size
        jobs += [{**train, "lib": "torch", "config": "floor", "model_size": size} for size in sizes
                 if not any(j["config"] == "floor" and j["model_size"] == size for j in jobs)]
        paired = {**common, "kind": "paired", "lib": "paired", "warmup": args.paired_warmup,
                  "steps": paired_cycles_at(args.paired_cycles, seq)}
        jobs += [{**paired, "config": c, "model_size": model_size_for(c, args.model_size)}
                 for c in args.configs if c != "floor" and args.paired_cycles > 0]
        infer = {**common, "kind": "infer", "warmup": args.infer_warmup, "steps": args.infer_steps}
        jobs += [{**infer, "lib": lib, "config": c, "model_size": model_size_for(c, args.model_size)}
                 for c in args.infer_configs for lib in CONFIGS[c][1]]
        specs += jobs
    return specs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=list(SUITES), default="issue5",
                   help="the configurations to run (issue5: the benchmark suite; all: every configuration)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="these configurations instead of a suite "
                   "(floor is always added)")
    p.add_argument("--seq", nargs="+", type=int, help="sequence lengths (default 256 1024; --quick: 64)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per job")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--infer-configs", nargs="+", choices=[c for c in CONFIGS if c not in NO_INFERENCE],
                   help="configurations timed for inference (default: the run's configurations that have it)")
    p.add_argument("--infer-steps", type=int, default=10, help="timed forwards per inference variant")
    p.add_argument("--infer-warmup", type=int, default=2)
    p.add_argument("--no-infer", dest="infer", action="store_false", help="skip the inference jobs")
    p.add_argument("--paired-cycles", type=int, default=40, help="cycles of the paired timing job per configuration "
                   "at seq <= 256, fewer at longer ones, at least 20 (floor and each library in one process, one "
                   "step each per cycle; 0: none)")
    p.add_argument("--paired-warmup", type=int, default=2, help="untimed cycles before them")
    p.add_argument("--paired-only", action="store_true", help="only the paired timing jobs (no protocol training "
                   "jobs, no inference, no file size)")
    p.add_argument("--no-file", dest="file", action="store_false", help="skip the adapter file size")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--retries", type=int, default=4, help="repeats of a CPU job that lost a core to another process")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round, 2 + 3 steps, seq 64")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="model weights, bf16 under bf16 autocast (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--model-size", choices=list(MODEL_SIZES), help='default: "small" on CPU, "1b" on CUDA')
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--render", metavar="JSON", help="only rewrite the Markdown and plot of an earlier run's JSON")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.model_size = args.model_size or ("1b" if cuda else "small")
    if args.quick:
        args.rounds, args.warmup, args.steps, args.infer_warmup, args.infer_steps = 1, 2, 3, 1, 3
        args.paired_warmup, args.paired_cycles = 1, 3
    args.seq = args.seq or ([64] if args.quick else [256, 1024])
    if args.configs:
        args.suite = None
    args.configs = list(dict.fromkeys(["floor", *(args.configs or SUITES[args.suite])]))
    if args.paired_only:
        args.infer = args.file = False
    if not args.infer:
        args.infer_configs = []
    elif args.infer_configs is None:
        args.infer_configs = [c for c in args.configs if c not in NO_INFERENCE]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        print(rerender(Path(args.render)).read_text())
        return
    env = environment(args)
    file_result = None
    if args.file:
        spec = {"kind": "file", "lib": "peftkit", "device": "cpu", "model_size": "small", "seed": 0,
                "threads": args.threads}
        file_result = {k: v for k, v in run_job(spec).items() if k in ("peftkit", "peft")}
    rounds = run_rounds(job_specs(args), args.rounds, args.retries)
    path = write_report(args, rounds, env, file_result)
    print(path.read_text())


if __name__ == "__main__":
    main()
