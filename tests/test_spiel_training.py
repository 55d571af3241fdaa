"""SpIEL's re-selection in real training: against the spec on a real optimizer, schedule and checkpoint resume, peftkit's loop, two ranks, and the
memory figure at density 1% (methods.md 5.1; the math is pinned in test_spiel_lofit.py)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.core.layer import adapter_layers
from peftkit.core.schedule import schedule_for
from peftkit.methods.spiel import SpIELConfig


def _dense(index, values, d_out, d_in):
    """ΔW written entry by entry."""
    out = torch.zeros(d_out, d_in, dtype=values.dtype)
    for i, v in zip(index.tolist(), values.tolist(), strict=True):
        out[i // d_in, i % d_in] += v
    return out


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))


class _Reference:
    """The re-selection written from the spec with plain sets, fed by autograd's dense weight gradients."""

    def __init__(self, k):
        self.k, self.cand, self.sum, self.sq, self.steps = k, None, None, None, 0

    def add_step(self, dense_grad):
        flat = dense_grad.flatten()
        if self.cand is None:
            self.cand = torch.topk(flat.abs(), self.k).indices
            self.sum, self.sq = torch.zeros(self.k, dtype=flat.dtype), torch.zeros(self.k, dtype=flat.dtype)
        self.sum += flat[self.cand]
        self.sq += flat[self.cand] ** 2
        self.steps += 1

    def expected(self, index, values, n):
        order = sorted(range(len(index)), key=lambda i: abs(values[i]))[:n]
        outgoing = {index[i] for i in order}
        kept = set(index) - outgoing
        free = [(abs(float(s)), int(c), j) for j, (c, s) in enumerate(zip(self.cand, self.sum, strict=True))
                if int(c) not in kept]
        grown = sorted(free, reverse=True)[:n]
        incoming = {c for _, c, _ in grown}
        stays = outgoing & incoming
        new = {c: j for _, c, j in grown if c not in stays}
        dropped = [index[i] for i in order if index[i] not in stays][: len(new)]
        return (set(index) - set(dropped)) | set(new), new, len(new)


def test_reselection_matches_the_spec_on_a_real_optimizer():
    """Windows of A = 2 steps every R = 3; |η| = k, no duplicates, the entries the spec picks, regrown values
    0, Adam rows seeded, replacement count floor(k p) - collisions, nothing outside η ever non-zero."""
    torch.manual_seed(0)
    model = _mlp().double()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = SpIELConfig(density=0.25, reselection_steps=3, selection_accumulation_steps=2, initial_reselection_rate=0.5,
                      targets=["0", "2"])
    peftkit.apply(model, cfg)
    layers = {"0": model[0], "2": model[2]}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, betas=(0.9, 0.99))
    schedule = schedule_for(model, total_steps=9)
    refs = {n: _Reference(m.k) for n, m in layers.items()}
    after_update = {}  # values right after each optimizer step, before the re-selection hook (registered later)
    opt.register_step_post_hook(lambda *_: after_update.update({n: m.sparse_values.tolist() for n, m in layers.items()}))
    g = torch.Generator().manual_seed(1)
    for step in range(1, 10):
        x, target = torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g).double()
        # reference dense gradients at the current W0 + ΔW
        dense = {n: _dense(m.sparse_index, m.sparse_values.detach(), m.d_out, m.d_in).requires_grad_(True)
                 for n, m in layers.items()}
        h = torch.tanh(x @ (base["0.weight"] + dense["0"]).T + base["0.bias"])
        F.mse_loss(h @ (base["2.weight"] + dense["2"]).T + base["2.bias"], target, reduction="sum").backward()
        F.mse_loss(model(x), target, reduction="sum").backward()
        if schedule.in_window(step):
            for n in layers:
                refs[n].add_step(dense[n].grad)
        schedule.step(step, opt)
        before = {n: m.sparse_index.tolist() for n, m in layers.items()}
        opt.step()
        opt.zero_grad()
        if schedule.ends_window(step):
            p = 1.0 if step == 2 else 0.5 * (1 - step / 9)
            for n, m in layers.items():
                n_drop = math.floor(m.k * p)
                expected, new, count = refs[n].expected(before[n], after_update[n], n_drop)
                index = m.sparse_index.tolist()
                assert set(index) == expected and len(index) == m.k == len(set(index)) and index == sorted(index)
                assert schedule.replaced[n] == count and count <= n_drop
                state, t = opt.state[m.sparse_values], float(opt.state[m.sparse_values]["step"])
                for entry, j in new.items():
                    slot = index.index(entry)
                    assert m.sparse_values[slot] == 0
                    mean = refs[n].sum[j] / refs[n].steps
                    torch.testing.assert_close(state["exp_avg"][slot], mean * (1 - 0.9**t))
                    torch.testing.assert_close(state["exp_avg_sq"][slot], refs[n].sq[j] / refs[n].steps * (1 - 0.99**t))
                refs[n] = _Reference(m.k)
        for n, m in layers.items():  # the base never changes; ΔW lives on η only
            assert torch.equal(m.base.weight, base[f"{n}.weight"])
            outside = torch.ones(m.d_out * m.d_in, dtype=torch.bool)
            outside[m.sparse_index] = False
            assert not m.delta_weight().flatten()[outside].any()
    assert set(schedule.replaced) == {"0", "2"}


def test_schedule_state_dict_resumes_exactly():
    def run(stop_at=None, resume=None):
        torch.manual_seed(0)
        model = _mlp().double()
        peftkit.apply(model, SpIELConfig(density=0.3, reselection_steps=4, selection_accumulation_steps=3))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        schedule = schedule_for(model, total_steps=10)
        start = 1
        if resume is not None:
            model.load_state_dict(resume["model"], strict=False)
            opt.load_state_dict(resume["opt"])
            schedule.load_state_dict(resume["schedule"])
            start = resume["step"] + 1
        g = torch.Generator().manual_seed(5)
        data = [(torch.randn(6, 12, generator=g).double(), torch.randn(6, 6, generator=g).double()) for _ in range(10)]
        for step in range(start, 11):
            x, y = data[step - 1]
            F.mse_loss(model(x), y).backward()
            schedule.step(step, opt)
            opt.step()
            opt.zero_grad()
            if step == stop_at:
                snap = {k: v.clone() for k, v in model.state_dict().items()}
                return {"model": snap, "opt": _clone(opt.state_dict()), "schedule": _clone(schedule.state_dict()),
                        "step": step}
        return model

    whole = run()
    resumed = run(resume=run(stop_at=6))  # mid-window: steps 5-7 form the second window
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_peftkit_loop_runs_the_reselection_and_resumes_mid_window_exactly(tmp_path):
    from peftkit.core.io import adapter_state_dict
    from peftkit.train.loop import train

    from train_toy import base_classifier, stack, toy_config, toy_data

    def spiel_classifier():
        cfg = SpIELConfig(density=0.25, reselection_steps=4, selection_accumulation_steps=2, targets=["fc1", "fc2"])
        return peftkit.apply(base_classifier(), cfg)

    cfg = dict(max_steps=12, save_every=5, keep_checkpoints=3, eval_every=0, grad_accum=2)
    clean = spiel_classifier()
    initial = clean.fc1.sparse_index.clone()
    train(clean, toy_data(64), None, toy_config(tmp_path / "clean", **cfg), stack)  # adds the schedule itself
    assert not torch.equal(clean.fc1.sparse_index, initial)  # re-selected after steps 2, 6 and 10
    checkpoint = tmp_path / "clean" / "checkpoint-000005"  # inside the window of steps 5-6
    assert (checkpoint / "schedule.safetensors").is_file()
    resumed = spiel_classifier()
    train(resumed, toy_data(64), None, toy_config(tmp_path / "resumed", **cfg), stack, resume=checkpoint)
    for key, value in adapter_state_dict(clean).items():
        torch.testing.assert_close(adapter_state_dict(resumed)[key], value, rtol=0, atol=1e-6, msg=key)


def _two_rank_run(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = _mlp()
        peftkit.apply(model, SpIELConfig(density=0.25, reselection_steps=3, selection_accumulation_steps=2))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        schedule = schedule_for(model, total_steps=8)
        g = torch.Generator().manual_seed(100 + rank)  # each rank sees other data: other statistics
        for step in range(1, 9):
            F.mse_loss(model(torch.randn(8, 12, generator=g)), torch.randn(8, 6, generator=g)).backward()
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= 2
            schedule.step(step, opt)
            opt.step()
            opt.zero_grad()
        layer = model[0]
        torch.save([layer.sparse_index, layer.sparse_values.detach(), opt.state[layer.sparse_values]["exp_avg"]],
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_the_same_reselection(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_rank_run, args=(port, str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def test_spiel_memory_at_density_one_percent_is_under_three_percent_of_full_fine_tuning():
    """Bytes of values + indices + AdamW state vs full fine-tuning's weights + AdamW state, for the same
    weights: every linear layer of the benchmark's 16.8M-parameter Llama (hidden 384, 6 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=6, vocab_size=8000, tie_word_embeddings=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 8000, (1, 8))

    def one_step(model, params):
        opt = torch.optim.AdamW(params)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        return sum(t.nbytes for t in state)

    torch.manual_seed(0)
    sparse = LlamaForCausalLM(LlamaConfig(**shape))
    peftkit.apply(sparse, SpIELConfig(density=0.01, targets=targets))
    layers = list(adapter_layers(sparse).values())
    values = [m.sparse_values for m in layers]
    spiel_bytes = sum(v.nbytes + m.sparse_index.nbytes for v, m in zip(values, layers, strict=True))
    spiel_bytes += one_step(sparse, values)
    torch.manual_seed(0)
    full = LlamaForCausalLM(LlamaConfig(**shape))
    for p in full.parameters():
        p.requires_grad_(False)
    dense = [m.weight for n, m in full.named_modules() if n.split(".")[-1] in targets]
    for w in dense:
        w.requires_grad_(True)
    full_bytes = sum(w.nbytes for w in dense) + one_step(full, dense)
    ratio = spiel_bytes / full_bytes
    print(f"SpIEL density 1%: {spiel_bytes:,} B vs full fine-tuning {full_bytes:,} B = {100 * ratio:.2f}%")
    assert len(dense) == len(layers) == 42 and ratio < 0.03
