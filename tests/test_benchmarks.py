"""Smoke tests of the benchmark suite (benchmarks/): every configuration builds and trains a step with
each library the protocol runs it with, and the report's ratios and files come out of known numbers.
The timed runs themselves are not tests (this machine is shared and noisy); see benchmarks/README.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_step  # noqa: E402
import report  # noqa: E402
import worker  # noqa: E402
from protocol import CONFIGS, MODEL_SIZES  # noqa: E402

# 16 attention heads in all (LoFiT stage 2 picks 16), a few thousand parameters
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128)


def _spec(config: str, lib: str, **extra) -> dict:
    size = "small-bias" if config in ("bitfit", "difffit") else "small"
    return {"kind": "train", "lib": lib, "config": config, "device": "cpu", "dtype": "fp32", "seed": 0,
            "model_size": size, "model": TINY, "batch": 2, "seq": 12, "threads": 1, "warmup": 1, "steps": 2,
            **extra}


@pytest.mark.parametrize("config,lib", [(c, lib) for c, (_, libs) in CONFIGS.items() for lib in libs])
def test_every_configuration_trains_with_its_library(config, lib):
    out = worker.train_job(_spec(config, lib))
    assert len(out["step_ms_all"]) == 2 and out["page_faults_per_step"] >= 0
    assert (out["trainable"] > 0) == (config != "floor")


@pytest.mark.parametrize("config,lib", [(c, lib) for c, (_, libs) in CONFIGS.items() for lib in libs])
def test_every_configuration_trains_in_bf16_under_autocast(config, lib):
    # the GPU protocol's path (bf16 weights, bf16 autocast, fp32 adapter tensors), here on CPU: a method
    # mixing dtypes under autocast fails here before anyone pays for a GPU run (PEGO's penalty did)
    out = worker.train_job(_spec(config, lib, dtype="bf16"))
    assert len(out["step_ms_all"]) == 2 and (out["trainable"] > 0) == (config != "floor")


def test_cuda_run_is_bf16_on_a_1b_model_in_its_own_files():
    args = bench_step.parse_args(["--device", "cuda", "--no-file"])
    specs = bench_step.job_specs(args)
    assert {(s["device"], s["dtype"]) for s in specs} == {("cuda", "bf16")}
    assert {s["model_size"] for s in specs} <= {"1b", "1b-bias"}
    assert report.results_stem(args).startswith("results-cuda-1b")
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # shapes only: no memory
        model = LlamaForCausalLM(LlamaConfig(**worker.model_kwargs(specs[0])))
    assert sum(p.numel() for p in model.parameters()) >= 1_000_000_000  # issue 5: at least 1B parameters


def test_inference_job_runs_in_bf16_under_autocast():
    assert isinstance(worker.autocast({"device": "cpu", "dtype": "bf16"}), torch.autocast)
    out = worker.run({**_spec("lora16-all", "peftkit", kind="infer", dtype="bf16"), "steps": 2})
    assert {"base", "unmerged", "merged"} <= set(out["forward_ms"])


def _job(lib: str, config: str, step_ms: float, mem: float, seq: int = 64, trainable: int = 10) -> dict:
    return {"kind": "train", "lib": lib, "config": config, "model_size": "small", "seq": seq, "step_ms": step_ms,
            "peak_delta_mb": mem, "trainable": trainable, "base_params": 1000, "attempts": 1, "round": 0}


def test_ratios_are_medians_of_per_round_ratios_and_the_files_are_written(tmp_path):
    # floor 100 / 200 / 100 ms: per-round ratios of a 110 / 200 / 130 ms job are 1.1 / 1.0 / 1.3 -> median 1.1
    rounds = [[_job("torch", "floor", f, 400, trainable=0), _job("peftkit", "lora16-all", k, 450),
               _job("peft", "lora16-all", p, 500)]
              for f, k, p in ((100, 110, 120), (200, 200, 250), (100, 130, 120))]
    args = bench_step.parse_args(["--configs", "lora16-all", "--seq", "64", "--no-infer", "--no-file",
                                  "--out", str(tmp_path)])
    env = report.environment(args)
    path = report.write_report(args, rounds, env, None)
    data = json.loads(path.with_suffix(".json").read_text())
    (section,) = data["sections"]
    row = next(r for r in section["train"] if r["lib"] == "peftkit")
    assert row["x_floor"] == pytest.approx(1.1)
    assert row["x_peft"] == pytest.approx(110 / 120)  # rounds: 0.917, 0.8, 1.083 -> median 0.917
    assert row["mem_x_peft"] == pytest.approx(0.9)
    assert any(t.startswith("[foundation] LoRA r16") and t.endswith("(met)") for t in section["targets"])
    text = path.read_text()
    assert "## Summary" in text and path.with_suffix(".png").stat().st_size > 0
    path.unlink()
    assert report.rerender(path.with_suffix(".json")).read_text() == text


def test_model_sizes_keep_the_baseline_model():
    small = MODEL_SIZES["small"]
    assert (small["hidden_size"], small["intermediate_size"], small["num_hidden_layers"]) == (384, 1024, 6)


@pytest.mark.parametrize("config", ["lora16-all", "full"])
def test_paired_job_times_the_floor_and_every_library_in_one_process(config):
    out = worker.run({**_spec(config, "paired", kind="paired"), "warmup": 1, "steps": 3})
    libs = CONFIGS[config][1]
    assert set(out["step_ms"]) == {"floor", *libs}
    assert all(len(t) == 3 for t in out["step_ms_all"].values())
    for lib in libs:  # each cycle's ratio is that cycle's own step over its own floor step
        expect = [t / f for t, f in zip(out["step_ms_all"][lib], out["step_ms_all"]["floor"], strict=True)]
        assert out["ratios"][lib] == pytest.approx(expect)
        lo, hi = out["ratio_quartiles"][lib]
        assert lo <= out["ratio_median"][lib] <= hi
    assert ("peftkit/peft" in out["ratios"]) == ("peft" in libs)


def _paired(ratios: dict, seq: int = 64) -> dict:
    return {"kind": "paired", "lib": "paired", "config": "lora16-all", "model_size": "small", "seq": seq,
            "ratios": ratios, "attempts": 1, "round": 0}


def test_paired_ratios_are_pooled_over_rounds_into_median_and_quartiles(tmp_path):
    rounds = [[_paired({"peftkit": [1.0, 1.2], "peft": [1.3, 1.3], "peftkit/peft": [0.8, 0.9]})],
              [_paired({"peftkit": [1.1, 1.05, 1.3], "peft": [1.2, 1.4, 1.25], "peftkit/peft": [0.85, 1.0, 0.7]})]]
    args = bench_step.parse_args(["--configs", "lora16-all", "--seq", "64", "--paired-only", "--out", str(tmp_path)])
    path = report.write_report(args, rounds, report.environment(args), None)
    (section,) = json.loads(path.with_suffix(".json").read_text())["sections"]
    assert section["train"] == [] and section["infer"] == []
    kit = next(r for r in section["paired"] if r["lib"] == "peftkit")
    assert kit["cycles"] == 5 and kit["x_floor"] == pytest.approx(1.1)  # 1.0 1.05 1.1 1.2 1.3
    assert kit["x_peft"] == pytest.approx(0.85) and kit["x_floor_quartiles"][0] < 1.1 < kit["x_floor_quartiles"][1]
    peft = next(r for r in section["paired"] if r["lib"] == "peft")
    assert peft["x_peft"] is None and peft["x_floor"] == pytest.approx(1.3)
    assert any("(paired), step x floor <= 1.1: 1.100 (met)" in t for t in section["targets"])
    assert any("(paired), step x peft <= 0.9: 0.850 (met)" in t for t in section["targets"])
    assert "paired timing" in path.read_text() and path.with_suffix(".png").stat().st_size > 0


def test_paired_jobs_are_in_the_suite_unless_switched_off():
    args = bench_step.parse_args(["--configs", "lora16-all", "--seq", "64"])
    kinds = [s["kind"] for s in bench_step.job_specs(args)]
    assert kinds.count("paired") == 1 and "train" in kinds  # floor has no paired job of its own
    args = bench_step.parse_args(["--configs", "lora16-all", "--seq", "64", "--paired-only"])
    assert {s["kind"] for s in bench_step.job_specs(args)} == {"paired"} and not args.infer and not args.file
    args = bench_step.parse_args(["--configs", "lora16-all", "--seq", "64", "--paired-cycles", "0"])
    assert "paired" not in [s["kind"] for s in bench_step.job_specs(args)]


def test_paired_cycles_shrink_with_the_sequence_but_not_below_twenty_or_the_request():
    args = bench_step.parse_args(["--configs", "lora16-all", "--seq", "256", "1024", "4096", "--paired-only"])
    assert [s["steps"] for s in bench_step.job_specs(args)] == [40, 20, 20]
    assert bench_step.paired_cycles_at(80, 1024) == 20
    assert bench_step.paired_cycles_at(160, 1024) == 40 and bench_step.paired_cycles_at(5, 1024) == 5
    assert bench_step.paired_cycles_at(3, 64) == 3
