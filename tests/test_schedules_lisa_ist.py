"""LISA (methods.md 5.3) and IST (5.4): which blocks train when, optimizer state, scores, resume, errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import peftkit
from peftkit.core.config import ConfigError
from peftkit.methods.lora import LoRAConfig
from peftkit.schedules.ist import IST, score_update
from peftkit.schedules.lisa import LISA, transformer_blocks

from tiny_models import MODELS, example_inputs

BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer"}


def deep_llama(layers: int = 6, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def lm_batch(step: int) -> dict:
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


def loss_of(model, kind: str, step: int) -> torch.Tensor:
    inputs = example_inputs(kind, seed=step)
    if kind == "bert":
        return model(**inputs, labels=torch.tensor([0, 1])).loss
    return model(**inputs, labels=inputs["input_ids"]).loss


def block_params(model, name: str) -> list[set[int]]:
    return [{id(p) for p in block.parameters()} for block in model.get_submodule(name)]


def through_checkpoint(state: dict, tmp_path) -> dict:
    """A schedule state after the loop's checkpoint format: tensors via safetensors, the rest via JSON."""
    from safetensors.torch import load_file, save_file

    from peftkit.train.checkpoint import split_schedule_state

    tensors, rest = split_schedule_state(state)
    save_file(tensors, tmp_path / "schedule.safetensors")
    return {**load_file(tmp_path / "schedule.safetensors"), **json.loads(json.dumps(rest))}


def trainable_ids(model) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


# --- LISA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_lisa_trains_outside_blocks_and_gamma_blocks_and_keeps_state_for_them_only(kind):
    model = MODELS[kind]().train()
    assert transformer_blocks(model)[0] == BLOCKS[kind]
    lisa = LISA(model, gamma=1, period=2, seed=3)
    blocks = block_params(model, BLOCKS[kind])
    outside = {id(p) for p in model.parameters()} - set().union(*blocks)
    emb = model.get_input_embeddings().weight
    head = (model.get_output_embeddings() or model.classifier).weight
    assert {id(emb), id(head)} <= outside
    optimizer = torch.optim.AdamW(lisa.parameters(), lr=1e-2)
    for step in range(1, 7):
        active = [i for i, ids in enumerate(blocks) if ids <= trainable_ids(model)]
        assert trainable_ids(model) == outside | set().union(*(blocks[i] for i in active)) and len(active) == 1
        assert emb.requires_grad and head.requires_grad
        loss_of(model, kind, step).backward()
        lisa.step(step, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        # the state is exactly that of what trained this step: outside + the period's block
        assert {id(p) for p in optimizer.state} == outside | blocks[active[0]]


def test_lisa_head_always_trains_llama():
    model = MODELS["llama"]().train()
    LISA(model, gamma=1, period=1)
    assert model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad


def test_lisa_changes_blocks_only_at_multiples_of_period_and_drops_old_state():
    model = deep_llama().train()
    lisa = LISA(model, gamma=2, period=3, seed=0)
    optimizer = torch.optim.AdamW(lisa.parameters(), lr=1e-3)
    seen, state_sizes = [], []
    for step in range(1, 13):
        seen.append(tuple(lisa.active))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(**lm_batch(step)).loss.backward()
        lisa.step(step, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # zero-filled grads of idle blocks must not move them
        moved = {int(n.split(".")[2]) for n, p in model.named_parameters()
                 if n.startswith("model.layers.") and not torch.equal(before[n], p)}
        assert moved == set(seen[-1])
        state_sizes.append(sum(s["exp_avg"].numel() for s in optimizer.state.values()))
    for step in range(2, 13):  # changes happen only between periods
        if (step - 1) % 3:
            assert seen[step - 1] == seen[step - 2]
    assert len(set(seen)) > 2
    full = sum(p.numel() for p in model.parameters())
    assert max(state_sizes) < full  # never the full model's moments
    assert len(set(state_sizes)) == 1  # γ blocks of one size each: the same state every step


def test_lisa_sampling_frequency_is_gamma_over_blocks():
    model = deep_llama(layers=6)
    lisa = LISA(model, gamma=2, period=1, seed=1)
    n, counts = 3000, torch.zeros(6)
    for step in range(1, n + 1):
        counts[lisa.active] += 1
        lisa.step(step)
    freq = counts / n
    sigma = math.sqrt((1 / 3) * (2 / 3) / n)  # a binomial proportion's standard error at p = γ/N_L = 1/3
    assert (freq - 1 / 3).abs().max() < 5 * sigma, freq


def run_lisa(model, steps: int, lisa=None, optimizer=None, start: int = 1):
    lisa = lisa or LISA(model, gamma=2, period=2, seed=5)
    optimizer = optimizer or torch.optim.AdamW(lisa.parameters(), lr=1e-2)
    for step in range(start, start + steps):
        model(**lm_batch(step)).loss.backward()
        lisa.step(step, optimizer)
        optimizer.step()
        optimizer.zero_grad()
    return lisa, optimizer


def test_lisa_resume_equals_uninterrupted(tmp_path):
    whole = deep_llama().train()
    run_lisa(whole, 9)
    part = deep_llama().train()
    lisa, optimizer = run_lisa(part, 4)  # saved right after a draw (K = 2)
    saved = (copy.deepcopy(part.state_dict()), copy.deepcopy(optimizer.state_dict()),
             through_checkpoint(lisa.state_dict(), tmp_path))
    resumed = deep_llama(seed=1).train()  # other weights: everything comes from the checkpoint
    resumed.load_state_dict(saved[0])
    lisa2 = LISA(resumed, gamma=2, period=2, seed=99)
    lisa2.load_state_dict(saved[2])
    optimizer2 = torch.optim.AdamW(lisa2.parameters(), lr=1e-2)
    optimizer2.load_state_dict(saved[1])
    run_lisa(resumed, 5, lisa2, optimizer2, start=5)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_lisa_bad_input():
    with pytest.raises(ConfigError, match="gamma=3 must be an integer in \\[1, 2\\].*2 transformer blocks"):
        LISA(MODELS["llama"](), gamma=3)
    with pytest.raises(ConfigError, match="period"):
        LISA(MODELS["llama"](), gamma=1, period=0)
    with pytest.raises(ConfigError, match="use IST"):
        LISA(peftkit.apply(MODELS["llama"](), LoRAConfig(r=2)), gamma=1)
    model = MODELS["llama"]()
    lisa = LISA(model, gamma=1)
    trainable_now = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ConfigError, match="lisa.parameters"):
        lisa.step(1, torch.optim.AdamW(trainable_now))


# --- IST ------------------------------------------------------------------------------------------
def lora_llama(layers: int = 6, seed: int = 0):
    return peftkit.apply(deep_llama(layers, seed), LoRAConfig(r=2, targets=["q_proj", "v_proj"])).train()


def adapter_blocks(model) -> dict[int, list[torch.nn.Parameter]]:
    out: dict[int, list] = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            out.setdefault(int(name.split(".")[2]), []).append(p)
    return out


def test_ist_trains_exactly_num_update_blocks_per_step():
    model = lora_llama()
    # built before IST freezes anything: the optimizer holds every adapter parameter (or use ist.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ist = IST(model, num_update=2, update_interval=3, eval_batch=lm_batch(0), seed=1)
    blocks, drawn = adapter_blocks(model), set()
    for step in range(1, 10):
        active = {i for i, ps in blocks.items() if any(p.requires_grad for p in ps)}
        assert len(active) == 2 and all(p.requires_grad for i in active for p in blocks[i])
        drawn.add(tuple(sorted(active)))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(**lm_batch(step)).loss.backward()
        ist.step(step, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        moved = {int(n.split(".")[2]) for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        assert moved == active  # B starts at 0, but A moves from the first step
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert len(drawn) > 1
    ist.detach()
    assert all(p.requires_grad for ps in blocks.values() for p in ps)


def test_score_update_equals_hand_computation():
    scores = torch.tensor([0.0, 0.5, -1.0, 2.0])
    sets, losses = [[0, 1], [1, 3], [2, 3]], [1.0, 2.0, 0.5]
    e = [math.exp(-x) for x in losses]
    r = [x - sum(e) / 3 for x in e]
    p = [1 / (1 + math.exp(-s)) for s in scores.tolist()]
    g = [q * (1 - q) for q in p]
    expected = [0.0 + 10 * r[0] * g[0], 0.5 + 10 * (r[0] + r[1]) * g[1], -1.0 + 10 * r[2] * g[2],
                2.0 + 10 * (r[1] + r[2]) * g[3]]
    assert torch.allclose(score_update(scores, sets, losses, 10.0), torch.tensor(expected), atol=1e-6)
    assert torch.equal(score_update(scores, sets, [0.7] * 3, 10.0), scores)  # equal losses: no change


def test_ist_scores_use_the_suppressed_losses_and_change_only_every_interval():
    model = lora_llama()
    for n, p in model.named_parameters():  # non-zero B so that suppression changes the loss
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.5)
    batch = lm_batch(0)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    scalings = [m.scaling for m in model.modules() if hasattr(m, "lora_A")]
    logged = []

    def eval_loss(m):
        assert not m.training
        logged.append((sorted(i for i, layers in enumerate(ist.layers) if layers[0].scaling != scalings[0]),
                       m(**batch).loss.item()))
        return logged[-1][1]

    ist = IST(model, num_update=1, update_interval=4, eval_loss=eval_loss, seed=2)
    scores = []
    for step in range(1, 9):
        before = ist.scores.clone()
        ist.step(step)
        scores.append(not torch.equal(before, ist.scores))
        assert model.training
    assert scores == [False, False, False, True] * 2 and ist.updates == 2
    sets, losses = [s for s, _ in logged[3:]], [x for _, x in logged[3:]]
    assert all(len(s) == 3 for s in sets) and len({tuple(s) for s in sets}) == 3
    # replay the second update from the first one's result: the closed form on the measured losses
    first = score_update(torch.zeros(6), [s for s, _ in logged[:3]], [x for _, x in logged[:3]], 10.0)
    assert torch.allclose(ist.scores, score_update(first, sets, losses, 10.0))
    assert [m.scaling for m in model.modules() if hasattr(m, "lora_A")] == scalings  # restored
    assert all(torch.equal(reference[n], p) for n, p in model.named_parameters())


def test_ist_suppression_hook_path_restores_and_matches_scaling():
    model = lora_llama()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    ist = IST(model, num_update=1, update_interval=0)
    batch = lm_batch(0)
    with torch.no_grad():
        plain = model(**batch).logits
        with ist.suppressed([0, 2]):
            scaled = model(**batch).logits
        for layer in ist.layers[0] + ist.layers[2]:  # the hook path: a layer without a numeric scaling
            layer.scaling = torch.tensor(layer.scaling)
        with ist.suppressed([0, 2]):
            hooked = model(**batch).logits
        assert torch.allclose(hooked, scaled, atol=1e-5) and not torch.allclose(scaled, plain, atol=1e-4)
        assert torch.equal(model(**batch).logits, plain)


def run_ist(model, steps: int, ist=None, optimizer=None, start: int = 1):
    ist = ist or IST(model, num_update=2, update_interval=2, eval_batch=lm_batch(0), seed=4)
    optimizer = optimizer or torch.optim.AdamW(ist.parameters(), lr=1e-2)
    for step in range(start, start + steps):
        model(**lm_batch(step)).loss.backward()
        ist.step(step, optimizer)
        optimizer.step()
        optimizer.zero_grad()
    return ist, optimizer


def test_ist_resume_equals_uninterrupted(tmp_path):
    whole = lora_llama()
    ist_whole, _ = run_ist(whole, 9)
    part = lora_llama()
    ist, optimizer = run_ist(part, 4)  # saved right after a score update (T_u = 2)
    saved = (copy.deepcopy(part.state_dict()), copy.deepcopy(optimizer.state_dict()),
             through_checkpoint(ist.state_dict(), tmp_path))
    resumed = lora_llama(seed=1)
    resumed.load_state_dict(saved[0])
    ist2 = IST(resumed, num_update=2, update_interval=2, eval_batch=lm_batch(0), seed=77)
    optimizer2 = torch.optim.AdamW(ist2.parameters(), lr=1e-2)
    optimizer2.load_state_dict(saved[1])
    ist2.load_state_dict(saved[2])
    run_ist(resumed, 5, ist2, optimizer2, start=5)
    assert torch.equal(ist_whole.scores, ist2.scores) and ist_whole.active == ist2.active
    assert ist_whole.scores.abs().sum() > 0
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_ist_bad_input():
    with pytest.raises(ConfigError, match="no trainable adapter layer"):
        IST(deep_llama(), update_interval=0)
    with pytest.raises(ConfigError, match="num_update=7 must be an integer in \\[1, 6\\]"):
        IST(lora_llama(), num_update=7, update_interval=0)
    with pytest.raises(ConfigError, match="exactly one of eval_batch"):
        IST(lora_llama())
    with pytest.raises(ConfigError, match="distinct sets"):
        IST(peftkit.apply(MODELS["llama"](), LoRAConfig(r=2)), eval_batch=lm_batch(0))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_ist_finds_the_adapted_blocks_of_each_architecture(kind):
    model = peftkit.apply(MODELS[kind](), LoRAConfig(r=2)).train()
    ist = IST(model, num_update=1, num_suppress=1, trials=2, eval_loss=lambda m: loss_of(m, kind, 0).item())
    assert ist.blocks_name == BLOCKS[kind] and len(ist.params) == 2
    blocks = block_params(model, BLOCKS[kind])
    for step in range(1, 4):
        active = {i for i, ids in enumerate(blocks) if ids & trainable_ids(model)}
        assert active == set(ist.active) and len(active) == 1
        loss_of(model, kind, step).backward()
        ist.step(step)
        for p in model.parameters():
            p.grad = None
    assert ist.updates == 0 and ist.update_interval == 10


@pytest.mark.parametrize("config", [peftkit.IA3Config(), peftkit.BottleneckConfig(), peftkit.DoRAConfig(r=2)],
                         ids=lambda c: type(c).__name__)
def test_ist_suppression_restores_other_adapters(config):
    model = peftkit.apply(deep_llama(layers=4), config).train()
    for p in model.parameters():  # move away from the identity init so that suppression shows
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.3)
    ist = IST(model, num_update=1, update_interval=1, eval_batch=lm_batch(0))
    with torch.no_grad():
        model.eval()
        plain = model(**lm_batch(0)).logits
        with ist.suppressed([0, 1]):
            assert not torch.allclose(model(**lm_batch(0)).logits, plain, atol=1e-5)
        assert torch.equal(model(**lm_batch(0)).logits, plain)
        model.train()
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    ist.step(1)  # a score update: three suppressed evaluations, then everything as it was
    assert ist.updates == 1 and model.training
    assert all(torch.equal(values[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(**lm_batch(0)).logits, plain)
