"""Runs that stay trustworthy: non-finite values never reach a checkpoint, resume under changed
settings, stray or corrupt files in output_dir, a lock per output_dir, and file permissions."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.config import ConfigError
from peftkit.core.io import adapter_state_dict
from peftkit.train import finite, loop
from peftkit.train.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint
from peftkit.train.distributed import Dist
from peftkit.train.loop import NonFiniteLossError, TrainConfig, linear_schedule, train
from peftkit.train.output_dir import OutputDirError, claim

from tiny_models import tiny_llama
from train_toy import lora_classifier, stack, toy_config, toy_data

INF, NAN = float("inf"), float("nan")


@pytest.fixture(autouse=True)
def _no_loss_plot(request, monkeypatch):
    """Drawing loss.png is most of a toy run's time; only the permissions test needs the real file."""
    if "umask" not in request.node.name:
        monkeypatch.setattr(loop, "plot_loss", lambda metrics, path: None)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


def _lm_data(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, 8), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def _lora_llama(alpha: float = 8.0):
    return peftkit.apply(tiny_llama(), peftkit.LoRAConfig(r=2, alpha=alpha, targets=["q_proj", "v_proj"]))


def _all_checkpoint_tensors_finite(out: Path) -> bool:
    from safetensors.torch import load_file

    files = [p for p in out.glob("checkpoint-*/*.safetensors")]
    return bool(files) and all(torch.isfinite(t).all() for p in files for t in load_file(p).values()
                               if t.is_floating_point())


# --- 1. non-finite and nonsensical settings ---------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("lr", INF, "lr must be a finite number"), ("lr", NAN, "lr must be a finite number"),
    ("lr", -1e-3, "lr must be > 0"), ("weight_decay", INF, "weight_decay must be a finite number"),
    ("max_grad_norm", NAN, "max_grad_norm must be a finite number"),
    ("max_grad_norm", -INF, "max_grad_norm must be a finite number"), ("epochs", INF, "epochs must be a finite number"),
    ("warmup_ratio", NAN, "warmup_ratio must be a finite number"), ("max_steps", 1.5, "max_steps must be an integer"),
    ("batch_size", True, "batch_size must be a number"), ("lr", "fast", "lr must be a number"),
    ("progress", "no", "progress must be true or false"), ("overwrite", 1, "overwrite must be true or false"),
    ("keep_checkpoints", 0, "keep_checkpoints must be >= 1"),
])
def test_train_config_refuses_non_finite_mistyped_and_out_of_range_values(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_train_config_takes_whole_floats_and_paths():
    cfg = TrainConfig(max_steps=10.0, save_every=2.0, output_dir=Path("runs") / "x")
    assert cfg.max_steps == 10 and isinstance(cfg.max_steps, int) and cfg.save_every == 2
    assert cfg.output_dir == os.path.join("runs", "x")


class Explode:
    """At one step, a huge (finite) learning rate and large (finite) gradients: the update overflows
    the weights although the loss and the gradients were finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, step, model, optimizer) -> None:
        if step == self.step:
            for group in optimizer.param_groups:
                group["lr"] = 1e38
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1e10)


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("make", ["mlp", "llama"])
def test_an_update_that_overflows_the_weights_stops_before_a_checkpoint_holds_them(tmp_path, make):
    model, data = (lora_classifier(), toy_data(64)) if make == "mlp" else (_lora_llama(), _lm_data(32))
    cfg = toy_config(tmp_path, max_steps=10, save_every=2, keep_checkpoints=5, eval_every=0, max_grad_norm=0.0)
    with pytest.raises(NonFiniteLossError, match=r"update of step 4 made trainable weights NaN or infinite") as err:
        train(model, data, None, cfg, stack, optimizer=_sgd, callbacks=[Explode(4)])
    assert err.value.what == "weights" and err.value.checkpoint == tmp_path / "checkpoint-000002"
    assert "checkpoint-000002" in str(err.value) and err.value.names
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000002"
    assert not (tmp_path / "checkpoint-000004").exists() and not (tmp_path / "adapter").exists()
    assert _all_checkpoint_tensors_finite(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "stopped: non-finite weights at step 4" and metrics["steps"] == 3


def test_an_overflow_at_the_first_step_writes_nothing(tmp_path):
    cfg = toy_config(tmp_path, max_steps=4, save_every=1, eval_every=0, max_grad_norm=0.0)
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written") as err:
        train(lora_classifier(), toy_data(32), None, cfg, stack, optimizer=_sgd, callbacks=[Explode(1)])
    assert err.value.what == "weights" and err.value.step == 1 and err.value.checkpoint is None
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "adapter").exists()


class BadGradientAt:
    """A finite loss whose gradient on one trainable tensor is NaN or inf at one step."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value, self.calls, self.before = step, value, 0, None

    def extra_loss(self, model):
        self.calls += 1
        if self.calls != self.step:
            return None
        self.before = _weights(model)
        p = next(p for p in model.parameters() if p.requires_grad)
        return _Grad.apply(p, self.value)


class _Grad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, value):
        ctx.shape, ctx.value = x.shape, value
        return (x * 0).sum()

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, ctx.value), None


@pytest.mark.parametrize("value, max_grad_norm", [(INF, 0.0), (NAN, 0.0), (INF, 1.0), (-INF, 0.5)])
def test_a_non_finite_gradient_stops_before_the_update(tmp_path, value, max_grad_norm):
    model = lora_classifier()
    bad = BadGradientAt(step=5, value=value)
    cfg = toy_config(tmp_path, max_steps=10, save_every=3, eval_every=0, max_grad_norm=max_grad_norm)
    with pytest.raises(NonFiniteLossError, match=r"gradient of .*lora_A.* is NaN or infinite at step 5") as err:
        train(model, toy_data(64), None, cfg, stack, callbacks=[bad])
    assert err.value.what == "gradient" and err.value.checkpoint == tmp_path / "checkpoint-000003"
    after = _weights(model)
    for key, value_before in bad.before.items():  # the model holds step 4's weights
        torch.testing.assert_close(after[key], value_before, rtol=0, atol=0)
    assert _all_checkpoint_tensors_finite(tmp_path)
    # the named checkpoint is good: resuming (without the fault) finishes the run
    resumed = train(lora_classifier(), toy_data(64), None, cfg, stack, resume=True)
    assert resumed["status"] == "completed" and all(math.isfinite(r["loss"]) for r in resumed["train_loss"])


def test_every_rank_stops_when_one_rank_sees_a_non_finite_gradient(monkeypatch):
    """The flag rides in the loss's all-reduce: a rank with finite gradients stops too."""
    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.ones(3)
    other_rank = torch.tensor([2.0, 1.0])  # the peer's loss and its "gradient not finite" flag
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.add_(other_rank))
    run = Dist(0, 2, torch.device("cpu"), False)
    loss, grads_ok = finite.loss_and_gradients(torch.tensor(4.0), params, run)
    assert loss == 3.0 and not grads_ok
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.add_(1.0))
    assert not finite.weights_finite(params, run)
    other_rank[1] = 0.0
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.add_(other_rank))
    assert finite.loss_and_gradients(torch.tensor(4.0), params, run) == (3.0, True)


def test_the_finiteness_check_is_exact_on_large_finite_values_and_mixed_dtypes():
    big = torch.full((4,), 3e38)  # the L2 norm of this overflows; the values are finite
    assert not bool(finite.nonfinite([big, torch.ones(2, dtype=torch.bfloat16), torch.empty(0), None]))
    assert bool(finite.nonfinite([big, torch.tensor([1.0, NAN], dtype=torch.bfloat16)]))
    assert bool(finite.nonfinite([torch.tensor([-INF])])) and not bool(finite.nonfinite([]))


# --- 2. resuming under changed settings -------------------------------------------------------
def _first_run(out: Path, **overrides) -> dict:
    cfg = toy_config(out, **{"max_steps": 6, "save_every": 3, "eval_every": 0, **overrides})
    return train(lora_classifier(), toy_data(64), None, cfg, stack)


@pytest.mark.parametrize("changes", [{"max_steps": 12}, {"lr": 2e-2}, {"max_steps": 9, "lr": 5e-3, "warmup_steps": 4}])
def test_a_resumed_run_follows_the_current_schedule_and_warns(tmp_path, changes):
    _first_run(tmp_path)
    cfg = toy_config(tmp_path, **{"max_steps": 6, "save_every": 3, "eval_every": 0, **changes})
    if cfg.max_steps == 6:  # lr changed only: resume from the middle of the run
        (tmp_path / "checkpoint-last").unlink()
        os.symlink("checkpoint-000003", tmp_path / "checkpoint-last")
    start = 6 if cfg.max_steps > 6 else 3
    with pytest.warns(UserWarning, match="changed schedule") as record:
        metrics = train(lora_classifier(), toy_data(64), None, cfg, stack, resume=True)
    assert any(name in str(record[0].message) for name in changes)
    lrs = {r["step"]: r["lr"] for r in metrics["train_loss"]}
    for step in range(start + 1, cfg.max_steps + 1):  # never the old schedule's lr 0 or old peak
        expected = cfg.lr * linear_schedule(step - 1, cfg.warmup_steps, cfg.max_steps)
        assert lrs[step] == pytest.approx(expected, rel=1e-12), step
    assert lrs[start + 1] > 0


def test_resuming_with_unchanged_settings_repeats_the_uninterrupted_run_exactly(tmp_path):
    whole, half = lora_classifier(), lora_classifier()
    train(whole, toy_data(64), None, toy_config(tmp_path / "a", max_steps=8, save_every=4, eval_every=0,
                                                  warmup_steps=3), stack)
    cfg = toy_config(tmp_path / "b", max_steps=8, save_every=4, eval_every=0, warmup_steps=3)
    train(half, toy_data(64), None, cfg, stack, resume=tmp_path / "a" / "checkpoint-000004")
    for key, value in _weights(whole).items():
        torch.testing.assert_close(_weights(half)[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("adapter", [
    {"alpha": 16}, {"r": 2}, {"dropout": 0.1}, {"targets": ["fc1"]}, {"modules_to_save": []},
])
def test_resume_refuses_a_changed_adapter_config_and_leaves_the_model_alone(tmp_path, adapter):
    _first_run(tmp_path)
    torch.manual_seed(0)
    fields = {"r": 4, "alpha": 8, "targets": ["fc1", "fc2"], "modules_to_save": ["head"], **adapter}
    from train_toy import base_classifier

    model = peftkit.apply(base_classifier(), peftkit.LoRAConfig(**fields))
    before = _weights(model)
    name = next(iter(adapter))
    with pytest.raises(CheckpointError, match=rf"another adapter config or base \(.*{name}"):
        train(model, toy_data(64), None, toy_config(tmp_path, max_steps=6, save_every=3), stack, resume=True)
    for key, value in before.items():
        torch.testing.assert_close(_weights(model)[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("change", ["drift", "permute"])
def test_resume_refuses_another_base_and_leaves_the_model_alone(tmp_path, change):
    _first_run(tmp_path)
    from train_toy import base_classifier

    base = base_classifier()
    with torch.no_grad():  # 0.3% drift of every entry, or two rows swapped: the fingerprint's two cases
        w = base.fc2.weight
        w.mul_(1.003) if change == "drift" else w.copy_(w[[1, 0, *range(2, w.shape[0])]])
    model = peftkit.apply(base, peftkit.LoRAConfig(r=4, alpha=8, targets=["fc1", "fc2"], modules_to_save=["head"]))
    before = _weights(model)
    with pytest.raises(CheckpointError, match="another adapter config or base.*base weights of fc2"):
        train(model, toy_data(64), None, toy_config(tmp_path, max_steps=6, save_every=3), stack, resume=True)
    for key, value in before.items():
        torch.testing.assert_close(_weights(model)[key], value, rtol=0, atol=0)
    train(lora_classifier(), toy_data(64), None, toy_config(tmp_path, max_steps=6, save_every=3), stack,
          resume=True)  # the same base resumes


def test_resume_refuses_another_method_on_another_architecture(tmp_path):
    cfg = toy_config(tmp_path, max_steps=4, save_every=2, eval_every=0)
    train(_lora_llama(alpha=8), _lm_data(32), None, cfg, stack)
    with pytest.raises(CheckpointError, match=r"alpha: 8.0 then, 4.0 now"):
        train(_lora_llama(alpha=4), _lm_data(32), None, cfg, stack, resume=True)
    dora = peftkit.apply(tiny_llama(), peftkit.DoRAConfig(r=2, alpha=8, targets=["q_proj", "v_proj"]))
    with pytest.raises(CheckpointError, match="method: 'lora' then, 'dora' now|other trainable parameters"):
        train(dora, _lm_data(32), None, cfg, stack, resume=True)


def test_resuming_past_the_new_max_steps_says_what_to_change(tmp_path):
    _first_run(tmp_path)
    with pytest.raises(ConfigError, match=r"step 6, past this run's last step 4.*raise max_steps above 6"):
        train(lora_classifier(), toy_data(64), None, toy_config(tmp_path, max_steps=4, save_every=3), stack,
              resume=True)
    with pytest.raises(ConfigError, match="past this run's last step 2"):  # epochs decide the length too
        train(lora_classifier(), toy_data(16), None, toy_config(tmp_path, max_steps=None, epochs=1, save_every=3),
              stack, resume=True)


# --- 3. output directories ----------------------------------------------------------------------
def _strays(out: Path) -> dict[str, str]:
    """Entries with checkpoint-like names that are not checkpoints of this run."""
    out.mkdir(parents=True, exist_ok=True)
    elsewhere = out.parent / "elsewhere"
    (elsewhere / "checkpoint-000001").mkdir(parents=True)
    (elsewhere / "checkpoint-000001" / "keep.txt").write_text("mine")
    (out / "checkpoint-foo").mkdir()
    (out / "checkpoint-best").mkdir()
    (out / "checkpoint-best" / "model.bin").write_text("best")
    (out / "checkpoint-000010").write_text("a file, not a checkpoint")
    os.symlink(elsewhere / "checkpoint-000001", out / "checkpoint-000001")  # a symlinked "checkpoint"
    os.symlink(out / "missing", out / "checkpoint-000003")  # dangling
    (out / "checkpoint-00000x").mkdir()
    return {"checkpoint-foo": "dir", "checkpoint-best": "dir", "checkpoint-000010": "file",
            "checkpoint-000001": "link", "checkpoint-000003": "link", "checkpoint-00000x": "dir"}


def test_stray_checkpoint_like_entries_neither_stop_saving_nor_get_deleted(tmp_path):
    out = tmp_path / "run"
    strays = _strays(out)
    cfg = toy_config(out, max_steps=8, save_every=2, keep_checkpoints=1, eval_every=0)
    metrics = train(lora_classifier(), toy_data(64), None, cfg, stack)
    assert metrics["status"] == "completed"
    assert sorted(p.name for p in out.glob("checkpoint-0*") if p.is_dir() and not p.is_symlink()) == [
        "checkpoint-000008", "checkpoint-00000x"]
    for name, kind in strays.items():
        path = out / name
        assert {"dir": path.is_dir, "file": path.is_file, "link": path.is_symlink}[kind](), name
    assert (tmp_path / "elsewhere" / "checkpoint-000001" / "keep.txt").read_text() == "mine"
    assert (out / "checkpoint-best" / "model.bin").read_text() == "best"
    # and resuming in such a directory reads only real checkpoints
    cfg = toy_config(out, max_steps=10, save_every=2, keep_checkpoints=1, eval_every=0)
    assert train(lora_classifier(), toy_data(64), None, cfg, stack, resume=True)["steps"] == 10


@pytest.mark.parametrize("leftover", ["everything", "metrics only", "checkpoints only", "link only"])
def test_a_fresh_run_in_a_used_output_dir_is_refused_unless_resume_or_overwrite(tmp_path, leftover):
    save_every = 0 if leftover == "metrics only" else 2
    _first_run(tmp_path, save_every=save_every)
    if leftover == "checkpoints only":  # a killed run: no metrics.json yet
        (tmp_path / "metrics.json").unlink()
    if leftover == "link only":
        for path in tmp_path.glob("checkpoint-0*"):
            __import__("shutil").rmtree(path)
        (tmp_path / "metrics.json").unlink()
    (tmp_path / "run.yaml").write_text("a user's file")
    cfg = toy_config(tmp_path, max_steps=4, save_every=0, eval_every=0)
    with pytest.raises(OutputDirError, match=r"another run's files.*resume=True.*overwrite=True"):
        train(lora_classifier(), toy_data(64), None, cfg, stack)
    # overwrite: the old run's files go, the run is this run's alone (its NaN names no old checkpoint)
    nan = BadGradientAt(step=3, value=NAN)
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written") as err:
        train(lora_classifier(), toy_data(64), None, cfg, stack, overwrite=True, callbacks=[nan])
    assert err.value.checkpoint is None and latest_checkpoint(tmp_path) is None
    assert not list(tmp_path.glob("checkpoint-*")) and (tmp_path / "run.yaml").read_text() == "a user's file"
    metrics = train(lora_classifier(), toy_data(64), None, toy_config(tmp_path, max_steps=4, save_every=2,
                                                                        overwrite=True), stack)
    assert metrics["steps"] == 4 and sorted(p.name for p in tmp_path.glob("checkpoint-0*")) == [
        "checkpoint-000002", "checkpoint-000004"]


def test_without_overwrite_a_fresh_run_deletes_nothing(tmp_path):
    """Files a run also writes, but that no run left here (no checkpoints, no metrics.json), stay."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    (tmp_path / "checkpoint-best").mkdir()
    cfg = toy_config(tmp_path, max_steps=2, save_every=0, eval_every=0, save_adapter=False)
    assert train(lora_classifier(), toy_data(32), None, cfg, stack)["status"] == "completed"
    assert (tmp_path / "adapter" / "notes.txt").read_text() == "mine" and (tmp_path / "checkpoint-best").is_dir()


def test_the_cli_refuses_a_used_output_dir_before_loading_and_names_both_flags(tmp_path, capsys):
    from peftkit.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text("{}")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: {tmp_path / 'no-such-model'}}}\n"
                      f"train: {{max_steps: 2, output_dir: {tmp_path / 'out'}}}\n")
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code != 0 and "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    # with --overwrite the run goes on to load the model (which this config lacks), so the check passed
    code = main(["train", str(config), "--overwrite"])
    assert code != 0 and "another run" not in capsys.readouterr().err


def _three_checkpoints(out: Path) -> None:
    _first_run(out, save_every=2, keep_checkpoints=3)  # checkpoints 2, 4, 6


def test_without_the_link_resume_takes_the_highest_complete_checkpoint(tmp_path):
    _three_checkpoints(tmp_path)
    (tmp_path / "checkpoint-last").unlink()
    cfg = toy_config(tmp_path, max_steps=8, save_every=2, keep_checkpoints=3, eval_every=0)
    with pytest.warns(UserWarning, match="changed schedule"):
        metrics = train(lora_classifier(), toy_data(64), None, cfg, stack, resume=True)
    assert [r["step"] for r in metrics["train_loss"]] == list(range(1, 9))  # 1-6 from the checkpoint's history
    # a kill between the rename and the link: the newest directory is also incomplete
    (tmp_path / "checkpoint-last").unlink()
    (tmp_path / "checkpoint-000008" / "trainer_state.json").unlink()
    cfg = toy_config(tmp_path, max_steps=8, save_every=2, keep_checkpoints=3, eval_every=0)
    with pytest.warns(UserWarning, match=r"resuming from .*checkpoint-000006.*checkpoint-000008.*no trainer_state"):
        metrics = train(lora_classifier(), toy_data(64), None, cfg, stack, resume=True)
    assert metrics["steps"] == 8 and latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000008"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[9] ^= 0xFF  # inside a safetensors header, or a JSON byte
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage", [
    ("trainer_state.json", _truncate), ("trainer_state.json", lambda p: p.write_text("{}")),
    ("trainer_state.json", lambda p: p.write_text('{"step": "six"}')), ("adapter.safetensors", _truncate),
    ("optimizer.safetensors", _truncate), ("rng.safetensors", lambda p: p.unlink()),
    ("peftkit_adapter.json", _flip), ("optimizer.safetensors", _flip),
])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, name, damage):
    _three_checkpoints(tmp_path)
    damage(tmp_path / "checkpoint-000006" / name)
    cfg = toy_config(tmp_path, max_steps=6, save_every=2, keep_checkpoints=3, eval_every=0)
    with pytest.warns(UserWarning, match=r"resuming from \S*checkpoint-000004 .*instead of a newer.*checkpoint-000006"):
        metrics = train(lora_classifier(), toy_data(64), None, cfg, stack, resume=True)
    assert metrics["status"] == "completed" and [r["step"] for r in metrics["train_loss"]] == list(range(1, 7))
    read_checkpoint(tmp_path / "checkpoint-000006")  # rewritten, complete


def test_no_complete_checkpoint_or_a_corrupt_named_one_is_a_clear_error(tmp_path):
    _three_checkpoints(tmp_path)
    _truncate(tmp_path / "checkpoint-000004" / "trainer_state.json")
    cfg = toy_config(tmp_path, max_steps=6, save_every=2, eval_every=0)
    with pytest.raises(CheckpointError, match=r"checkpoint-000004.*trainer_state.json is truncated or corrupt"):
        train(lora_classifier(), toy_data(64), None, cfg, stack, resume=tmp_path / "checkpoint-000004")
    for step in (2, 6):
        _truncate(tmp_path / f"checkpoint-00000{step}" / "adapter.safetensors")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*overwrite=True"):
        train(lora_classifier(), toy_data(64), None, cfg, stack, resume=True)


def test_a_second_run_in_the_same_output_dir_is_refused_and_touches_nothing(tmp_path):
    _first_run(tmp_path)
    temporary = tmp_path / ".tmp-checkpoint-000008-999999"  # the running run's half-written checkpoint
    temporary.mkdir()
    cfg = toy_config(tmp_path, max_steps=8, save_every=2, eval_every=0)
    with claim(tmp_path):  # another run holds the directory (flock: per open file, so this process counts)
        with pytest.raises(OutputDirError, match=rf"another run is using output_dir .* \(pid {os.getpid()}\)"):
            train(lora_classifier(), toy_data(64), None, cfg, stack, resume=True)
        with pytest.raises(OutputDirError, match="another run is using"):
            train(lora_classifier(), toy_data(64), None, cfg, stack, overwrite=True)
        assert temporary.is_dir() and (tmp_path / "checkpoint-000006").is_dir()
    # released: the run resumes, and a dead run's temporary directory is cleaned up
    assert train(lora_classifier(), toy_data(64), None, cfg, stack, resume=True)["steps"] == 8
    assert not temporary.exists()
    # a run that fails releases the lock too
    with pytest.raises(NonFiniteLossError):
        train(lora_classifier(), toy_data(64), None, cfg, stack, overwrite=True, callbacks=[BadGradientAt(2, NAN)])
    with claim(tmp_path):
        pass


# --- 4. permissions -----------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_and_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        cfg = toy_config(tmp_path / "run", max_steps=2, save_every=1, eval_every=0)
        train(lora_classifier(), toy_data(32), None, cfg, stack)
    finally:
        os.umask(old)
    wrong = {}
    for path in (tmp_path / "run").rglob("*"):
        if path.is_symlink():
            continue
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        if stat.S_IMODE(path.stat().st_mode) != want:
            wrong[str(path.relative_to(tmp_path))] = oct(stat.S_IMODE(path.stat().st_mode))
    assert not wrong, f"expected {oct(0o666 & ~umask)} files / {oct(0o777 & ~umask)} dirs: {wrong}"
