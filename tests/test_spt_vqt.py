"""SPT (methods.md 5.2) and VQT (10.2) against hand-written references on small tensors, plus the
memory claim of VQT: a training step needs less memory than LoRA's on the project's ViT."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import peftkit
from peftkit.core.apply import has_adapter
from peftkit.methods.spt import SPTConfig, spt_allocate, spt_plan, spt_sensitivity
from peftkit.methods.vqt import VQTConfig

from tiny_models import MODELS, example_inputs, output_of, tiny_gpt2


def _mse(model, batch):
    return output_of(model, batch).float().pow(2).mean()


def _vit_batches(n=3, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch, 1, 28, 28, generator=g),
             "labels": torch.randint(0, 4, (batch,), generator=g)} for _ in range(n)]


# --- SPT: sensitivity ------------------------------------------------------------------------
def test_sensitivity_of_a_linear_layer_is_the_closed_form_sum_of_squared_gradients():
    """L = mean((W x + b)^2) over a batch of n rows: dL/dW = (2 / (n d_out)) Σ_rows y x^T, dL/db = (2 / (n d_out)) Σ y."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    w, b = model[0].weight.detach(), model[0].bias.detach()
    batches = [{"input": torch.randn(4, 5, dtype=torch.float64)} for _ in range(3)]
    expected_w, expected_b = torch.zeros_like(w), torch.zeros_like(b)
    for batch in batches:
        x = batch["input"]
        y = x @ w.T + b
        expected_w += (2 / y.numel() * y.T @ x) ** 2
        expected_b += (2 / y.numel() * y.sum(0)) ** 2
    scores = spt_sensitivity(model, batches, loss_fn=lambda m, batch: m(batch["input"]).pow(2).mean(), skip=[])
    torch.testing.assert_close(scores["0.weight"].double(), expected_w, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(scores["0.bias"].double(), expected_b, rtol=1e-5, atol=1e-12)


def test_sensitivity_equals_backward_gradients_squared_and_skips_head_and_listed_names():
    model = MODELS["mlp"](0)
    batches = [example_inputs("mlp", batch=3, seed=s) for s in range(4)]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        twin = copy.deepcopy(model)
        _mse(twin, batch).backward()
        for n, p in twin.named_parameters():
            expected[n] += p.grad.square()
    scores = spt_sensitivity(model, batches, loss_fn=_mse, skip=["fc2"])
    assert set(scores) == {"fc1.weight", "fc1.bias"}  # head: always skipped; fc2: listed
    for name, score in scores.items():
        torch.testing.assert_close(score, expected[name], rtol=1e-5, atol=1e-9)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # nothing left behind


def test_default_skip_list_leaves_out_the_vit_embeddings_and_head():
    model = MODELS["vit"](0)
    scores = spt_sensitivity(model, _vit_batches(1))  # labels give .loss
    assert not any(n.startswith(("head.", "patch_embed.")) or n in ("cls_token", "pos_embed") for n in scores)
    assert "blocks.0.attn.qkv.weight" in scores and "norm.weight" in scores


# --- SPT: allocation -------------------------------------------------------------------------
def _hand_sensitivity(fc2_count: int) -> dict[str, torch.Tensor]:
    """fc1: 12 entries of score 10; fc2: `fc2_count` of 9; fc1.bias: 8 of 8; fc2.bias: 3 of 7; the rest 0."""
    scores = {"fc1.weight": torch.zeros(32, 16), "fc2.weight": torch.zeros(16, 32),
              "fc1.bias": torch.zeros(32), "fc2.bias": torch.zeros(16)}
    scores["fc1.weight"].view(-1)[torch.arange(0, 24, 2)] = 10.0
    scores["fc2.weight"].view(-1)[torch.arange(5, 5 + 3 * fc2_count, 3)] = 9.0
    scores["fc1.bias"][:8] = 8.0
    scores["fc2.bias"][4:7] = 7.0
    return scores


@pytest.mark.parametrize("fc2_count", [11, 12])
def test_a_matrix_goes_structured_iff_its_count_reaches_the_threshold(fc2_count):
    """r = 2, d_in + d_out = 48: LoRA has 96 parameters, α = 8 -> threshold 12 entries; β = 4 -> 8 of 32."""
    model = MODELS["mlp"](0)
    cfg = SPTConfig(budget=10**6, r=2, matrix_ratio=8.0, vector_ratio=4.0)
    tau = 12 + fc2_count + 8 + 3
    plan = spt_allocate(model, _hand_sensitivity(fc2_count), cfg, tau=tau)
    assert plan["tau"] == tau and plan["vectors"] == ["fc1.bias"]  # fc2.bias: 3 < 16 / 4
    if fc2_count == 12:
        assert plan["lora"] == ["fc1", "fc2"] and plan["sparse"] == {}
    else:
        assert plan["lora"] == ["fc1"]
        assert plan["sparse"] == {"fc2": list(range(5, 5 + 3 * 11, 3))}  # flat (d_out, d_in) indices


def test_budget_search_takes_the_largest_tau_that_fits():
    model = MODELS["mlp"](0)
    scores = _hand_sensitivity(11)
    cfg = SPTConfig(budget=150, r=2, matrix_ratio=8.0, vector_ratio=4.0)
    plan = spt_allocate(model, scores, cfg)
    # the defining property of the search's τ: its plan fits, one more entry's does not
    size = _size(model, cfg, plan)
    assert size <= 150 < _size(model, cfg, spt_allocate(model, scores, cfg, tau=plan["tau"] + 1))


def _size(model, cfg, plan) -> int:
    """r (d_in + d_out) per LoRA matrix + entries per sparse matrix + whole vectors, written out."""
    params = dict(model.named_parameters())
    lora = sum(cfg.r * (params[f"{n}.weight"].shape[0] + params[f"{n}.weight"].shape[1]) for n in plan["lora"])
    return lora + sum(len(i) for i in plan["sparse"].values()) + sum(params[n].numel() for n in plan["vectors"])


@pytest.mark.parametrize("budget", [150, 300, 500, 800])
def test_trainable_count_is_within_one_step_of_the_budget(budget):
    model = MODELS["vit"](0)
    cfg = spt_plan(model, _vit_batches(), SPTConfig(budget=budget, r=2))
    size = _size(model, cfg, cfg.plan)
    largest_step = max(cfg.r * 64, 48)  # the qkv LoRA (16 + 48 wide) or the widest vector (qkv.bias)
    assert budget - largest_step < size <= budget
    peftkit.apply(model, cfg)
    assert peftkit.trainable_parameters(model).trainable == size


def test_parameters_not_selected_receive_zero_update():
    model = MODELS["vit"](0)
    original = copy.deepcopy(model.state_dict())
    cfg = spt_plan(model, _vit_batches(), SPTConfig(budget=500, r=2))
    plan = cfg.plan
    assert plan["lora"] and plan["sparse"] and plan["vectors"]
    peftkit.apply(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for batch in _vit_batches(n=3, seed=7):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    final = peftkit.unload(peftkit.merge(model)).state_dict()
    for key, before in original.items():
        changed = final[key] != before
        module = key.rsplit(".", 1)[0]
        if key in plan["vectors"] or (module in plan["lora"] and key.endswith(".weight")):
            assert changed.any(), key
        elif module in plan["sparse"] and key.endswith(".weight"):
            allowed = torch.zeros(before.numel(), dtype=torch.bool)
            allowed[plan["sparse"][module]] = True
            assert changed.any() and not (changed.flatten() & ~allowed).any(), key
        else:
            assert not changed.any(), f"{key} changed but was not selected"


def test_conv1d_scores_are_read_in_the_canonical_layout():
    """GPT-2's Conv1D stores (d_in, d_out): its storage entry (i, j) is canonical entry (j, i)."""
    model = tiny_gpt2()
    names = [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    scores = {f"{n}.weight": torch.zeros(32, 96) for n in names}
    scores[f"{names[1]}.weight"][5, 70] = 1.0  # storage (i=5, j=70)
    plan = spt_allocate(model, scores, SPTConfig(budget=1, targets=["c_attn"]), tau=1)
    assert plan == {"tau": 1, "lora": [], "sparse": {names[1]: [70 * 32 + 5]}, "vectors": []}
    before = model.state_dict()[f"{names[1]}.weight"].clone()
    peftkit.apply(model, SPTConfig(targets=["c_attn"], plan=plan))
    with torch.no_grad():
        model.get_submodule(names[1]).values.fill_(0.5)
    after = peftkit.unload(peftkit.merge(model)).state_dict()[f"{names[1]}.weight"]
    changed = (after != before).nonzero().tolist()
    assert changed == [[5, 70]] and after[5, 70] == before[5, 70] + 0.5


def test_sparse_delta_forward_and_gradient_match_the_dense_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    index = [1, 7, 12, 29]
    peftkit.apply(model, SPTConfig(r=1, targets=["0"], plan={"tau": 4, "lora": [], "sparse": {"0": index},
                                                              "vectors": []}))
    layer = model[0]
    with torch.no_grad():
        layer.values.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    dense = torch.zeros(5, 6, dtype=torch.float64)
    for i, v in zip(index, layer.values.detach(), strict=True):
        dense[i // 6, i % 6] = v  # entry by entry
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    out = model(x)
    torch.testing.assert_close(out, x @ (w0 + dense).T + b0)
    torch.testing.assert_close(layer.delta_weight(), dense)
    g = torch.randn_like(out)
    out.backward(g)
    dense_grad = g.reshape(-1, 5).T @ x.detach().reshape(-1, 6)  # dL/dW of the summed weight
    torch.testing.assert_close(layer.values.grad, dense_grad.flatten()[index])
    torch.testing.assert_close(x.grad, g @ (w0 + dense))


def test_spt_config_errors_are_clear_at_apply_time():
    with pytest.raises(peftkit.ConfigError, match="budget"):
        SPTConfig()
    with pytest.raises(peftkit.ConfigError, match="matrix_ratio"):
        SPTConfig(budget=10, matrix_ratio=0.5)
    with pytest.raises(peftkit.ConfigError, match="strictly increasing"):
        SPTConfig(plan={"lora": [], "sparse": {"fc1": [3, 3]}, "vectors": []})
    with pytest.raises(peftkit.ConfigError, match="spt_plan"):
        peftkit.apply(MODELS["mlp"](0), SPTConfig(budget=100))
    model = MODELS["mlp"](0)
    with pytest.raises(peftkit.ConfigError, match="outside fc1's 32x16"):
        peftkit.apply(model, SPTConfig(plan={"lora": [], "sparse": {"fc1": [4, 512]}, "vectors": []}))
    assert not has_adapter(model)  # rolled back
    with pytest.raises(peftkit.ConfigError, match="exceeds min"):
        peftkit.apply(MODELS["mlp"](0), SPTConfig(r=20, plan={"lora": ["fc1"], "sparse": {}, "vectors": []}))
    with pytest.raises(peftkit.ConfigError, match="not target linear layers"):
        peftkit.apply(MODELS["mlp"](0), SPTConfig(plan={"lora": ["fc1", "q_proj"], "sparse": {}, "vectors": []}))
    with pytest.raises(peftkit.ConfigError, match="do not select"):
        SPTConfig(targets=["fc1"], plan={"lora": ["fc2"], "sparse": {}, "vectors": []})
    with pytest.raises(peftkit.ConfigError, match="lacks"):
        peftkit.apply(MODELS["mlp"](0), SPTConfig(plan={"lora": ["fc1"], "sparse": {}, "vectors": ["fc9.bias"]}))


# --- VQT -------------------------------------------------------------------------------------
def _tokens_into_blocks(model, inputs) -> torch.Tensor:
    seen = []
    handle = model.blocks.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        output_of(model, inputs)
    handle.remove()
    return seen[0]


def test_backbone_features_are_exactly_the_frozen_models():
    model = MODELS["vit"](0)
    inputs = example_inputs("vit")
    with torch.no_grad():
        frozen = model.forward_features(**inputs)
    peftkit.apply(model, VQTConfig(num_queries=3))
    model.train()  # query dropout active: the backbone must not care
    features = model.forward_features(**inputs)
    assert torch.equal(features, frozen)
    assert features.grad_fn is None  # ∂X_L/∂Q = 0: X_L is not even a function of Q in the graph
    with torch.no_grad():
        model.blocks.queries.mul_(-3.0).add_(1.0)
    assert torch.equal(model.forward_features(**inputs), frozen)


def _layer_norm(x, norm):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _reference_block(block, queries, x):
    """Z = [Q; X] through a pre-norm block with every key/value column of a query token masked out."""
    b, n, d = x.shape
    t, heads = queries.shape[0], block.attn.heads
    dh = d // heads
    z = torch.cat([queries.expand(b, -1, -1), x], dim=1)
    qkv = _layer_norm(z, block.norm1) @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = qkv.split(d, dim=-1)
    mixed = torch.zeros_like(z)
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(dh)  # (b, T + N, T + N)
        scores[:, :, :t] = float("-inf")  # keys and values from X only
        mixed[..., cols] = torch.softmax(scores, dim=-1) @ v[..., cols]
    z = z + mixed @ block.attn.proj.weight.T + block.attn.proj.bias
    mlp = block.mlp
    hidden = F.gelu(_layer_norm(z, block.norm2) @ mlp.fc1.weight.T + mlp.fc1.bias)
    z = z + hidden @ mlp.fc2.weight.T + mlp.fc2.bias
    return z[:, :t], z[:, t:]


def test_summaries_and_logits_match_the_masked_attention_reference():
    model = MODELS["vit"](0).double()
    inputs = {"pixel_values": example_inputs("vit")["pixel_values"].double()}
    x = _tokens_into_blocks(model, inputs)
    peftkit.apply(model, VQTConfig(num_queries=2))
    layer = model.blocks
    with torch.no_grad():
        logits = output_of(model, inputs)
        layer(x)
        summaries = layer.summaries
        expected = []
        for block, queries, summary in zip(layer.base, layer.queries, summaries, strict=True):
            ref_summary, x = _reference_block(block, queries, x)
            torch.testing.assert_close(summary, ref_summary, atol=1e-10, rtol=0)
            expected.append(ref_summary.flatten(1))
        cls = _layer_norm(x, model.norm)[:, 0]
        groups = [g / g.norm(dim=-1, keepdim=True) for g in [cls, *expected]]
        ref_logits = torch.cat(groups, dim=-1) @ layer.classifier.weight.T + layer.classifier.bias
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)


def test_query_gradient_is_nonzero_and_independent_of_later_layers():
    model = MODELS["vit"](0).double()
    inputs = {"pixel_values": example_inputs("vit")["pixel_values"].double()}
    x = _tokens_into_blocks(model, inputs)
    peftkit.apply(model, VQTConfig(num_queries=2, dropout=0.0))
    layer = model.blocks
    weights_of = torch.Generator().manual_seed(4)
    probes = [torch.randn(2, 2, 16, generator=weights_of, dtype=torch.float64) for _ in range(2)]

    def gradients():
        layer.queries.grad = None
        layer(x)
        sum((s * p).sum() for s, p in zip(layer.summaries, probes, strict=True)).backward()
        return layer.queries.grad.clone()

    before = gradients()
    assert before[0].abs().sum() > 0 and before[1].abs().sum() > 0
    with torch.no_grad():  # change everything after layer 0
        for p in layer.base[1].parameters():
            p.mul_(1.5).add_(0.1)
    after = gradients()
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)
    assert not torch.allclose(after[1], before[1])


def test_vqt_trainable_count_on_a_deeper_vit():
    from peftkit.train.vision import VisionConfig, ViT

    model = ViT(VisionConfig(patch_size=4, dim=24, depth=3, heads=3, num_classes=7))
    peftkit.apply(model, VQTConfig(num_queries=4))
    layers, tokens, d, classes = 3, 4, 24, 7
    assert peftkit.trainable_parameters(model).trainable == layers * tokens * d + (d + layers * tokens * d + 1) * classes
    bound = math.sqrt(6 / (3 * 4**2 + 24))  # p = 4, read from patch_embed.proj
    q = model.blocks.queries
    assert q.abs().max() <= bound and q.abs().max() > 0.8 * bound


def test_vqt_config_errors_are_clear_at_apply_time():
    with pytest.raises(peftkit.ConfigError, match="modules_to_save"):
        VQTConfig(modules_to_save=["head"])
    with pytest.raises(peftkit.ConfigError, match="layers"):
        VQTConfig(layers=[0])
    with pytest.raises(peftkit.ConfigError, match="no module matched"):
        peftkit.apply(MODELS["mlp"](0), VQTConfig())
    from peftkit.train.vision import CNN, VisionConfig

    with pytest.raises(peftkit.ConfigError, match="lacks"):
        peftkit.apply(CNN(VisionConfig(architecture="cnn", channels=[8, 8])), VQTConfig())
    model = MODELS["vit"](0)
    with pytest.raises(peftkit.ConfigError, match="has no module 'classifier'"):
        peftkit.apply(model, VQTConfig(head="classifier"))
    assert not isinstance(model.blocks, peftkit.AdapterLayer)  # rolled back
    assert not model.head._forward_hooks


# --- VQT memory: a training step against LoRA's on the project's ViT -------------------------
class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create inside the block (CPU has no allocator statistics).

    Storages that existed before (parameters, inputs; `known`) are not counted, so the figure is what a
    training step adds: saved activations, temporaries, gradients. Frees are seen at the next op.
    """

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.known and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def training_step_peak(cfg: peftkit.AdapterConfig, batch: int = 8) -> int:
    """Peak bytes a forward + backward of the shipped ViT (vit-fmnist) with `cfg` adds."""
    from peftkit.train.vision import load_vision_model

    torch.manual_seed(0)
    model = peftkit.apply(load_vision_model("vit-fmnist"), cfg).train()
    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(batch, 1, 28, 28, generator=g), "labels": torch.randint(0, 10, (batch,))}
    model(**inputs).loss.backward()  # warm-up: lazily made state is not part of the step
    model.zero_grad(set_to_none=True)
    known = [*model.parameters(), *model.buffers(), *inputs.values()]
    with PeakMemory(known) as tracker:
        model(**inputs).loss.backward()
    return tracker.peak


def test_vqt_training_step_needs_less_memory_than_lora():
    lora = training_step_peak(peftkit.LoRAConfig(r=8, alpha=16, targets=["qkv", "attn.proj", "fc1", "fc2"],
                                                 modules_to_save=["head"]))
    vqt = training_step_peak(VQTConfig(num_queries=5))
    print(f"\npeak training-step memory, vit-fmnist, batch 8: LoRA r8 {lora / 2**20:.2f} MiB, "
          f"VQT T=5 {vqt / 2**20:.2f} MiB ({vqt / lora:.2f}x)")
    assert vqt < 0.6 * lora
