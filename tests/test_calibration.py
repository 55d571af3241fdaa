"""Calibration: `peftkit.calibrate` finishes a config from task batches before `apply` (SPT's plan,
LoFiT's head choice), and `peftkit train` runs it by itself on the first training batches."""

from __future__ import annotations

import itertools

import pytest
import torch

import peftkit
from peftkit.methods.lofit import LoFiTConfig, LoFiTLayer
from peftkit.methods.spt import SPTConfig, spt_plan

from tiny_models import MODELS


def _vit_batches(n=3, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch, 1, 28, 28, generator=g),
             "labels": torch.randint(0, 4, (batch,), generator=g)} for _ in range(n)]


def _llama_batches(seed=0):
    """Endless labelled batches for the tiny Llama (vocab 100)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, 100, (2, 8), generator=g)
        yield {"input_ids": ids, "labels": ids}


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, model.training)


def _assert_unchanged(model, before):
    state, flags, training = before
    assert not peftkit.has_adapter(model) and model.training == training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_methods_without_calibration_get_their_config_back():
    cfg = peftkit.LoRAConfig(r=2, targets=["q_proj"])
    assert peftkit.calibrate(MODELS["llama"](0), cfg, iter(())) is cfg


def test_spt_calibration_is_spt_plan_and_leaves_the_model_unchanged():
    model = MODELS["vit"](0)
    before = _snapshot(model)
    cfg = SPTConfig(budget=500, r=2, sensitivity_batches=2)
    planned = peftkit.calibrate(model, cfg, itertools.cycle(_vit_batches()))
    _assert_unchanged(model, before)
    assert planned.plan == spt_plan(MODELS["vit"](0), _vit_batches(), cfg).plan and planned.plan["tau"] > 0
    assert peftkit.calibrate(model, planned, iter(())) is planned  # a planned config needs no data
    peftkit.apply(model, planned)
    with pytest.raises(peftkit.ConfigError, match="before peftkit.apply"):
        peftkit.calibrate(model, cfg, _vit_batches())


def _stage1_reference_heads(k: int, steps: int, lr: float, l1: float) -> list[list[int]]:
    """The paper's recipe written out: stage 1 (A only, CE + λ Σ|A|) with AdamW, then the top-k ‖A_h‖₂."""
    model = MODELS["llama"](0)
    torch.manual_seed(0)  # A's init draws, as in the calibrated run
    peftkit.apply(model, LoFiTConfig(l1=l1))
    model.train()
    scales = [(m.layer, m.lofit_scale) for m in model.modules() if isinstance(m, LoFiTLayer)]
    optimizer = torch.optim.AdamW([a for _, a in scales], lr=lr, weight_decay=0.0)
    for batch in itertools.islice(_llama_batches(), steps):
        loss = model(**batch).loss + l1 * sum(a.abs().sum() for _, a in scales)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ranked = []
    for layer, a in scales:
        per_head = a.detach().reshape(2, -1).norm(dim=1)  # tiny Llama: 2 heads per layer, 2 layers
        ranked += [(-float(per_head[h]), layer, h) for h in range(2)]
    return [[layer, h] for _, layer, h in sorted(ranked)[:k]]


def test_lofit_calibration_runs_stage_one_and_returns_the_top_k_heads():
    model = MODELS["llama"](0)
    before = _snapshot(model)
    torch.manual_seed(0)
    cfg = peftkit.calibrate(model, LoFiTConfig(top_k=3, select_steps=4, select_lr=5e-2), _llama_batches())
    _assert_unchanged(model, before)
    assert cfg.heads == _stage1_reference_heads(3, steps=4, lr=5e-2, l1=cfg.l1)
    peftkit.apply(model, cfg)
    assert peftkit.trainable_parameters(model).trainable == 3 * 32 // 2  # K d_head


def test_lofit_top_k_beyond_the_models_heads_fails_before_training():
    model = MODELS["llama"](0)
    before = _snapshot(model)
    steps = iter(range(1))

    def batches():
        next(steps)  # raising StopIteration here would mean a batch was read
        yield from _llama_batches()

    with pytest.raises(peftkit.ConfigError, match="k must be an integer in 1..4"):
        peftkit.calibrate(model, LoFiTConfig(top_k=5), batches())
    _assert_unchanged(model, before)
    with pytest.raises(peftkit.ConfigError, match="top_k must be a positive integer"):
        LoFiTConfig(top_k=0)


@pytest.mark.parametrize("method, fields", [
    ("spt", "{budget: 400, r: 2, sensitivity_batches: 2}"),
    ("lofit", "{top_k: 2, select_steps: 3}"),
])
def test_peftkit_train_calibrates_on_training_batches_and_saves_a_loadable_adapter(tmp_path, method, fields):
    from peftkit.train.run import load_run_config, run

    vit = MODELS["vit"](0)
    vit.save_pretrained(tmp_path / "vit")
    (tmp_path / "run.yaml").write_text(
        f"model: {{name: {tmp_path / 'vit'}, task: image-classification}}\n"
        "data: {dataset: digits, train_size: 32, eval_size: 16, test_size: 16}\n"
        f"method: {method}\nadapter: {fields}\n"
        f"train: {{max_steps: 2, batch_size: 8, log_every: 0, save_adapter: true, output_dir: {tmp_path / 'out'}}}\n")
    metrics = run(load_run_config(tmp_path / "run.yaml"))
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    from peftkit.train.models import load_model

    fresh, _ = load_model(str(tmp_path / "vit"), "image-classification", num_labels=10)
    loaded = peftkit.load(fresh, tmp_path / "out" / "adapter")
    cfg = loaded.peftkit_state.config
    assert (cfg.plan is not None) if method == "spt" else (len(cfg.heads) == 2)
    assert "head" in cfg.modules_to_save  # the fresh classifier head trained alongside


def test_lofit_heads_in_layers_the_model_lacks_raise_a_clear_error():
    model = MODELS["llama"](0)
    with pytest.raises(peftkit.ConfigError, match="config selects none of the matched modules"):
        peftkit.apply(model, LoFiTConfig(heads=[[7, 0]]))  # the tiny Llama has layers 0 and 1
    assert not peftkit.has_adapter(model)
