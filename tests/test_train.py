"""The training loop: learning, kill + resume, two-process runs, NaN stops, HF Trainer interop, outputs."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.config import ConfigError, field_docs
from peftkit.core.io import adapter_state_dict
from peftkit.train import loop
from peftkit.train.checkpoint import flatten_optimizer, latest_checkpoint, unflatten_optimizer
from peftkit.train.loop import NonFiniteLossError, TrainConfig, all_reduce_gradients, epoch_batches, train
from peftkit.train.plots import plot_tradeoff

from tiny_models import tiny_llama
from train_toy import base_classifier, lora_classifier, stack, toy_config, toy_data

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "train_toy.py"


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def _losses(metrics: dict) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics["train_loss"]]


# --- configuration and data order -------------------------------------------------------------
def test_config_validates_and_documents_every_field():
    with pytest.raises(ConfigError, match="lr must be > 0, got 0"):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError, match="warmup_steps or warmup_ratio, not both"):
        TrainConfig(warmup_steps=3, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="bf16 must be"):
        TrainConfig(bf16="sometimes")
    assert TrainConfig(bf16="false").bf16 is False
    assert TrainConfig(max_steps=7, epochs=3).total_steps(batches_per_epoch=100) == 7
    assert TrainConfig(epochs=2, grad_accum=3).total_steps(batches_per_epoch=10) == 7
    docs = field_docs(TrainConfig)
    assert set(docs) == {f for f in TrainConfig.__dataclass_fields__} and all(docs.values())


def test_data_order_is_a_function_of_seed_and_epoch_and_shards_are_disjoint():
    first = epoch_batches(10, 3, seed=5, epoch=2)
    assert first == epoch_batches(10, 3, seed=5, epoch=2)
    assert first != epoch_batches(10, 3, seed=5, epoch=3)
    shards = [sum(epoch_batches(10, 2, seed=5, epoch=0, rank=r, world=2), []) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5 and set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_linear_schedule_warms_up_then_decays_to_zero():
    lrs = [loop.linear_schedule(s, warmup=2, total=6) for s in range(7)]
    assert lrs[0] < lrs[1] < lrs[2] == 1.0 > lrs[3] > lrs[5] > lrs[6] == 0.0


# --- learning and outputs ---------------------------------------------------------------------
def test_lora_loss_decreases_and_outputs_are_written(tmp_path):
    model = lora_classifier()
    cfg = toy_config(tmp_path, lr=3e-2, max_steps=60, save_every=0, eval_every=30, warmup_steps=5,
                     batch_size=16, log_every=20)
    metrics = train(model, toy_data(256), toy_data(64, seed=1), cfg, stack)
    losses = [loss for _, loss in _losses(metrics)]
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    assert metrics["eval"][-1]["loss"] < metrics["eval"][0]["loss"] and metrics["eval"][-1]["accuracy"] > 0.6

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["status"] == "completed" and len(written["train_loss"]) == 60
    final = written["final"]
    assert final["trainable_params"] == peftkit.trainable_parameters(model).trainable
    assert final["time_s"] > 0 and final["samples_per_s"] > 0 and final["peak_rss_mb"] > 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final adapter is a normal peftkit adapter directory
    loaded = peftkit.load(base_classifier(), tmp_path / "adapter")
    x = stack(toy_data(4, seed=9))
    torch.testing.assert_close(loaded(**x)["logits"], model(**x)["logits"])


def test_bf16_autocast_runs_on_cpu_when_asked(tmp_path):
    cfg = toy_config(tmp_path, bf16=True, max_steps=3)
    metrics = train(lora_classifier(), toy_data(32), toy_data(16), cfg, stack)
    assert metrics["status"] == "completed" and all(math.isfinite(loss) for _, loss in _losses(metrics))
    assert metrics["eval"][-1]["step"] == 3


def test_plot_tradeoff_writes_a_png(tmp_path):
    rows = [{"method": "lora", "trainable_params": 452, "accuracy": 0.8},
            {"method": "full", "trainable_params": 1524, "accuracy": 0.85}]
    assert plot_tradeoff(rows, tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="lacks"):
        plot_tradeoff([{"method": "x"}], tmp_path / "u.png")


# --- checkpoints and resume -------------------------------------------------------------------
def test_optimizer_state_round_trips_without_pickle():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.8, 0.9))
    p.grad = torch.ones(3)
    opt.step()
    tensors, meta = flatten_optimizer(opt.state_dict())
    json.dumps(meta)
    restored = unflatten_optimizer(tensors, json.loads(json.dumps(meta)), opt.state_dict())
    assert restored["param_groups"][0]["betas"] == (0.8, 0.9)
    torch.testing.assert_close(restored["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # dropout makes the result depend on the restored RNG state, grad_accum on the data position
    args = ["--steps", "12", "--save-every", "4", "--grad-accum", "2", "--dropout", "0.1"]
    child = subprocess.Popen([sys.executable, str(TOY), str(killed), *args, "--sleep", "0.15"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 40
    while latest_checkpoint(killed) is None and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    _, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (killed / "metrics.json").exists()  # it really died mid-run
    saved_step = json.loads((latest_checkpoint(killed) / "trainer_state.json").read_text())["step"]
    assert 4 <= saved_step < 12

    resumed_model = lora_classifier(dropout=0.1)  # what a fresh process would build
    resumed = train(resumed_model, toy_data(64), toy_data(32, seed=1), toy_config(killed, grad_accum=2),
                    stack, resume=True)
    clean_model = lora_classifier(dropout=0.1)
    uninterrupted = train(clean_model, toy_data(64), toy_data(32, seed=1), toy_config(clean, grad_accum=2), stack)

    _assert_same_weights(_weights(resumed_model), _weights(clean_model))
    assert [s for s, _ in _losses(resumed)] == list(range(1, 13))
    for (_, a), (_, b) in zip(_losses(resumed), _losses(uninterrupted), strict=True):
        assert math.isclose(a, b, rel_tol=1e-6)
    assert [e["step"] for e in resumed["eval"]] == [6, 12]
    assert math.isclose(resumed["eval"][-1]["loss"], uninterrupted["eval"][-1]["loss"], rel_tol=1e-6)


class NaNAt:
    """Makes the loss NaN at one step and fingerprints the checkpoint files the step before."""

    def __init__(self, step: int, output_dir: Path) -> None:
        self.step, self.output_dir, self.calls, self.files_before = step, output_dir, 0, None

    def extra_loss(self, model) -> torch.Tensor:
        self.calls += 1
        return torch.tensor(float("nan") if self.calls == self.step else 0.0)

    def on_after_backward(self, step, model, optimizer) -> None:
        if step == self.step - 1:
            self.files_before = _digests(self.output_dir)


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.glob("checkpoint-*/*"))}


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    model = lora_classifier()
    nan = NaNAt(step=7, output_dir=tmp_path)
    cfg = toy_config(tmp_path, max_steps=12, save_every=5, eval_every=0)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7.*checkpoint-000005.*untouched") as err:
        train(model, toy_data(64), None, cfg, stack, callbacks=[nan])
    assert err.value.step == 7 and err.value.checkpoint == tmp_path / "checkpoint-000005"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000005"
    assert nan.files_before and _digests(tmp_path) == nan.files_before
    assert all(torch.isfinite(p).all() for p in model.parameters())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "stopped: non-finite loss at step 7" and metrics["steps"] == 6
    # the checkpoint it names is usable: resuming finishes the run
    resumed = train(lora_classifier(), toy_data(64), None, cfg, stack, resume=True)
    assert resumed["status"] == "completed" and resumed["steps"] == 12


# --- distributed --------------------------------------------------------------------------------
def test_only_trainable_gradients_are_all_reduced(tmp_path, monkeypatch):
    model = lora_classifier()
    passed = []
    monkeypatch.setattr(loop, "all_reduce_gradients", lambda params, world: passed.append(list(params)))
    train(model, toy_data(16), None, toy_config(tmp_path, max_steps=1, save_every=0), stack)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in passed[0]] == [id(p) for p in trainable]
    assert len(trainable) < len(list(model.parameters()))

    # the helper itself: one SUM per dtype over exactly those parameters, then divided by the world size
    model(**stack(toy_data(4)))["loss"].backward()
    before = [p.grad.clone() for p in trainable]
    sent = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: sent.append(t.numel()) or t.mul_(2))
    count = peftkit.trainable_parameters(model).trainable
    assert all_reduce_gradients(trainable, world_size=2) == sum(sent) == count + len(trainable)  # + has-grad flags
    for p, g in zip(trainable, before, strict=True):
        torch.testing.assert_close(p.grad, g)  # (g + g) / 2
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # a parameter no rank has a gradient for keeps none (optimizers skip it, as in one process)
    trainable[0].grad = None
    all_reduce_gradients(trainable, world_size=2)
    assert trainable[0].grad is None and trainable[1].grad is not None


def test_torchrun_two_ranks_on_cpu_match_each_other_and_one_process(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(TOY), str(tmp_path),
                             "--steps", "6", "--batch-size", "4"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    _assert_same_weights(rank0, rank1, atol=0)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["status"] == "completed" and metrics["steps"] == 6
    assert (tmp_path / "loss.png").exists() and latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000006"

    # two ranks x 4 examples average to the same gradient as one process with 8 (same examples)
    single = lora_classifier()
    train(single, toy_data(64), toy_data(32, seed=1), toy_config(tmp_path / "single", max_steps=6), stack)
    _assert_same_weights(_weights(single), rank0, atol=1e-5)


# --- Hugging Face Trainer interop ---------------------------------------------------------------
def test_hf_trainer_trains_a_peftkit_lora_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = peftkit.apply(tiny_llama(), peftkit.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = _weights(model)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 100, (16, 12), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()

    trained = _weights(model)
    assert all(not torch.equal(trained[k], adapter[k]) for k in trained if "lora_B" in k)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name
    peftkit.save(model, tmp_path / "adapter")
    reloaded = peftkit.load(tiny_llama(), tmp_path / "adapter")
    ids = data[0]["input_ids"][None]
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
