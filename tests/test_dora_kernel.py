"""DoRA's training kernels (dora.py): the one-GEMM form with W' formed per call (`FoldedDoRA`, bias-free
nn.Linear with at least d_in tokens), the in-place row scaling that saves the output instead of the
direction (`ScaleRows`, every other case), and the cached ||W0||^2 per row (`_BaseRowNorm`).

Gradients are checked against a hand-written float64 reference of the paper's formula,
W' = m (W0 + s B A) / ||W0 + s B A||_row with the norm detached, y = x W'^T + b0; memory by what
autograd saves (saved_tensors_hooks), compared with LoRA's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.core import weights
from peftkit.methods.dora import DoRAConfig

from tiny_models import tiny_gpt2

D_IN, D_OUT, RANK, ALPHA = 10, 7, 3, 6.0


def _dora_layer(bias: bool = True, dtype=torch.float64, seed: int = 0):
    """A DoRA-adapted Linear with random A, B and magnitude (so every gradient is generic)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=bias)).to(dtype)
    peftkit.apply(model, DoRAConfig(r=RANK, alpha=ALPHA, targets=["0"]))
    layer = model[0]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        layer.magnitude.mul_(1 + 0.5 * torch.rand(D_OUT, generator=g, dtype=torch.float64))
    return model, layer


def _reference(w0, b0, a, b, m, s, x):
    """The paper's DoRA forward written out: the weight is formed, the row norm detached."""
    v = w0 + s * b @ a  # (d_out, d_in)
    w = m[:, None] * v / v.norm(dim=1, keepdim=True).detach()
    return F.linear(x, w, b0)


def _grads(out: torch.Tensor, upstream: torch.Tensor, *tensors):
    return torch.autograd.grad(out, tensors, upstream)


FOLDED, SCALED = "FoldedDoRABackward", "ScaleRowsBackward"
TOKENS = {SCALED: 4, FOLDED: 12}
"""Token counts that select each kernel for a bias-free layer (folding pays from d_in = 10 tokens on)."""


def _kernel(out: torch.Tensor) -> str:
    return type(out.grad_fn).__name__


def _check_grads_against_reference(model, layer, w0, b0, tokens: int, zero_rows=()):
    with torch.no_grad():
        layer.magnitude[list(zero_rows)] = 0.0
    x = torch.randn(2, tokens // 2, D_IN, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, tokens // 2, D_OUT, dtype=torch.float64)
    params = (layer.magnitude, layer.lora_A, layer.lora_B)
    out = model(x)
    got = _grads(out, upstream, *params, x)
    leaves = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x.detach().clone().requires_grad_()
    m, a, b = leaves
    expected_out = _reference(w0, b0, a, b, m, layer.scaling, x_ref)
    expected = _grads(expected_out, upstream, m, a, b, x_ref)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for name, g, e in zip(("magnitude", "lora_A", "lora_B", "x"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=f"d{name} differs from the reference")
    return out, got


@pytest.mark.parametrize("kernel", [FOLDED, SCALED])
def test_gradients_of_m_a_b_and_x_equal_the_reference(kernel):
    model, layer = _dora_layer(bias=False)
    w0 = layer.base.weight.detach().clone()
    out, _ = _check_grads_against_reference(model, layer, w0, None, TOKENS[kernel])
    assert _kernel(out) == kernel


@pytest.mark.parametrize("tokens", TOKENS.values())
def test_gradients_with_a_bias_equal_the_reference(tokens):
    model, layer = _dora_layer(bias=True)
    w0, b0 = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    _check_grads_against_reference(model, layer, w0, b0, tokens)


@pytest.mark.parametrize("tokens", TOKENS.values())
def test_zero_magnitude_rows_fall_back_to_the_saved_direction(tokens):
    """With m_i = 0 the output row is 0 and cannot be divided back; dL/dm_i is still sum_t g_ti v_ti / n_i."""
    model, layer = _dora_layer(bias=False)
    w0 = layer.base.weight.detach().clone()
    out, got = _check_grads_against_reference(model, layer, w0, None, tokens, zero_rows=(1, 4))
    assert _kernel(out) == SCALED
    assert got[0][1].abs() > 1e-3 and got[0][4].abs() > 1e-3  # the reference's gradient there is not zero


def test_gpt2_conv1d_gradients_equal_the_reference():
    model = tiny_gpt2().double()
    peftkit.apply(model, DoRAConfig(r=2, alpha=4, targets=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, dtype=torch.float64))
    w0, b0 = layer.base.weight.detach().T.clone(), layer.base.bias.detach().clone()  # Conv1D stores (in, out)
    x = torch.randn(2, 3, w0.shape[1], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, w0.shape[0], dtype=torch.float64)
    got = _grads(layer(x), upstream, layer.magnitude, layer.lora_A, layer.lora_B, x)
    m, a, b = (p.detach().clone().requires_grad_() for p in (layer.magnitude, layer.lora_A, layer.lora_B))
    x_ref = x.detach().clone().requires_grad_()
    expected = _grads(_reference(w0, b0, a, b, m, layer.scaling, x_ref), upstream, m, a, b, x_ref)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", [FOLDED, SCALED])
@pytest.mark.parametrize("trained", ["magnitude", "factors"])
def test_gradients_when_only_some_parameters_train(trained, kernel):
    model, layer = _dora_layer(bias=False)
    for name in ("magnitude", "lora_A", "lora_B"):
        getattr(layer, name).requires_grad_((name == "magnitude") == (trained == "magnitude"))
    params = [p for p in (layer.magnitude, layer.lora_A, layer.lora_B) if p.requires_grad]
    x = torch.randn(TOKENS[kernel], D_IN, dtype=torch.float64)
    upstream = torch.randn(TOKENS[kernel], D_OUT, dtype=torch.float64)
    out = model(x)
    assert _kernel(out) == kernel
    got = _grads(out, upstream, *params)
    m, a, b = (p.detach().clone().requires_grad_(p.requires_grad)
               for p in (layer.magnitude, layer.lora_A, layer.lora_B))
    ref_params = [p for p in (m, a, b) if p.requires_grad]
    ref_out = _reference(layer.base.weight.detach(), None, a, b, m, layer.scaling, x)
    expected = _grads(ref_out, upstream, *ref_params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", TOKENS.values())
def test_inference_output_equals_the_reference(bias, tokens):
    model, layer = _dora_layer(bias=bias)
    x = torch.randn(tokens, D_IN, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        expected = _reference(layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                              layer.scaling, x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [FOLDED, SCALED])
def test_output_and_gradients_equal_hugging_face_peft(kernel):
    """Both kernels against peft's DoRA (a plain nn.Linear, float32): the interop tests' tiny models see too
    few tokens for the folded kernel."""
    import peft

    model, layer = _dora_layer(bias=False, dtype=torch.float32)
    their_config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"], use_dora=True)
    theirs = peft.get_peft_model(nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False)), their_config)
    their_layer = theirs.base_model.model[0]
    pairs = [(layer.lora_A, their_layer.lora_A["default"].weight),
             (layer.lora_B, their_layer.lora_B["default"].weight),
             (layer.magnitude, their_layer.lora_magnitude_vector["default"].weight)]
    with torch.no_grad():
        their_layer.base_layer.weight.copy_(layer.base.weight)
        for ours, their in pairs:
            their.copy_(ours)
    x = torch.randn(TOKENS[kernel], D_IN)
    upstream = torch.randn(TOKENS[kernel], D_OUT)
    out, out_peft = model(x), theirs(x)
    assert _kernel(out) == kernel
    torch.testing.assert_close(out, out_peft, rtol=1e-5, atol=1e-5)
    got = _grads(out, upstream, *(ours for ours, _ in pairs))
    expected = _grads(out_peft, upstream, *(their for _, their in pairs))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def _hook_calls(layer) -> list:
    calls: list = []
    layer.base.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("case", ["bias", "hook", "autocast", "dropout", "few_tokens"])
def test_the_base_runs_itself_where_folding_would_change_what_happens(case):
    """Folding bypasses base(x): only for a plain, hook-free, bias-free Linear in one dtype without
    autocast or active dropout, and with enough tokens to pay for forming W'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=case == "bias"))
    dropout = 0.1 if case == "dropout" else 0.0
    peftkit.apply(model, DoRAConfig(r=RANK, alpha=ALPHA, targets=["0"], dropout=dropout))
    layer = model[0].train()
    calls = _hook_calls(layer) if case == "hook" else []
    x = torch.randn(4 if case == "few_tokens" else 12, D_IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = model(x)
    assert _kernel(out) != FOLDED
    assert calls == ([1] if case == "hook" else [])
    if case == "dropout":  # dropout is off in eval: folding applies again
        assert _kernel(model.eval()(x)) == FOLDED


# --- what autograd keeps --------------------------------------------------------------------------
def _saved_storages(model: nn.Module, x: torch.Tensor, consumer=None) -> tuple[dict[int, int], torch.Tensor]:
    """Non-parameter storages autograd saves in one forward: {data_ptr: bytes}, and the layer output."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() != x.untyped_storage().data_ptr():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        if consumer is not None:
            consumer(out)
    return saved, out


def _llama_like_layer(method: str, d_in=32, d_out=48):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    cls = DoRAConfig if method == "dora" else peftkit.LoRAConfig
    peftkit.apply(model, cls(r=4, alpha=8, targets=["0"]))
    return model


BATCHES = {FOLDED: (8, 16), SCALED: (2, 8)}
"""(batch, seq) that select each kernel for `_llama_like_layer` (d_in 32): 128 and 16 tokens."""


@pytest.mark.parametrize("kernel", [FOLDED, SCALED])
def test_dora_saves_no_direction_next_to_its_output(kernel):
    """Per layer, DoRA keeps what LoRA keeps (x; h = x A^T, which the folded form recomputes) plus its output
    and (d_out,) vectors: no second (tokens, d_out) tensor for d(scale)."""
    x = torch.randn(*BATCHES[kernel], 32, requires_grad=True)
    lora_saved, _ = _saved_storages(_llama_like_layer("lora"), x)
    dora_saved, out = _saved_storages(_llama_like_layer("dora"), x)
    assert _kernel(out) == kernel
    out_bytes = out.untyped_storage().nbytes()
    assert out.untyped_storage().data_ptr() in dora_saved
    big = [n for ptr, n in dora_saved.items() if n >= out_bytes and ptr != out.untyped_storage().data_ptr()]
    assert not big, f"DoRA saves another output-sized tensor: {big}"
    assert sum(dora_saved.values()) <= sum(lora_saved.values()) + out_bytes + 4 * 48 * 4  # + (d_out,) vectors


@pytest.mark.parametrize("kernel", [FOLDED, SCALED])
def test_a_consumer_that_saves_the_output_shares_it(kernel):
    """Behind SiLU (which saves its input, as after Llama's gate) DoRA costs what LoRA costs, up to (d_out,)
    vectors."""
    x = torch.randn(*BATCHES[kernel], 32, requires_grad=True)
    lora_saved, _ = _saved_storages(_llama_like_layer("lora"), x, consumer=F.silu)
    dora_saved, _ = _saved_storages(_llama_like_layer("dora"), x, consumer=F.silu)
    assert sum(dora_saved.values()) <= sum(lora_saved.values()) + 4 * 48 * 4


@pytest.mark.parametrize("kernel", [FOLDED, SCALED])
def test_an_in_place_change_of_the_output_is_reported_by_backward(kernel):
    """The documented price of saving the output: changing it in place is an autograd error, not a wrong
    gradient."""
    model = _llama_like_layer("dora")
    out = model(torch.randn(*BATCHES[kernel], 32))
    assert _kernel(out) == kernel
    out.relu_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# --- the cached ||W0||^2 ------------------------------------------------------------------------
def _expected_norm(layer) -> torch.Tensor:
    w0 = layer.base.weight.detach()
    return (w0 + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()).norm(dim=1)


def test_base_norm_is_computed_once_while_the_base_is_unchanged():
    _, layer = _dora_layer()
    layer.row_norm()
    cached = layer._base_norm.value
    layer.row_norm()
    assert layer._base_norm.value is cached


@pytest.mark.parametrize("change", ["in_place", "new_data", "new_parameter"])
def test_a_changed_base_weight_is_seen(change):
    _, layer = _dora_layer()
    layer.row_norm()
    new = torch.randn(D_OUT, D_IN, dtype=torch.float64)
    if change == "in_place":
        with torch.no_grad():
            layer.base.weight.copy_(new)
    elif change == "new_data":
        layer.base.weight.data = new
    else:
        layer.base.weight = nn.Parameter(new, requires_grad=False)
    torch.testing.assert_close(layer.row_norm(), _expected_norm(layer), rtol=1e-12, atol=1e-12)


def test_a_base_written_by_set_weight_is_seen_without_forgetting():
    """weights.set_weight (merge, unmerge, PiSSA's shift, other methods' writes) bumps the version."""
    _, layer = _dora_layer()
    layer.row_norm()
    version = layer.base.weight._version
    weights.set_weight(layer.base, torch.randn(D_OUT, D_IN, dtype=torch.float64))
    assert layer.base.weight._version > version
    torch.testing.assert_close(layer.row_norm(), _expected_norm(layer), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [FOLDED, SCALED])
def test_merge_unmerge_and_training_keep_the_norm_exact(kernel):
    """merge/unmerge write the base in place; the cached value must follow."""
    model, layer = _dora_layer(bias=False)
    x = torch.randn(TOKENS[kernel], D_IN, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        peftkit.merge(model)  # the base now holds the merged weight: ||W + sBA|| of that weight
        torch.testing.assert_close(layer.row_norm(), _expected_norm(layer), rtol=1e-12, atol=1e-12)
        peftkit.unmerge(model)
        torch.testing.assert_close(layer.row_norm(), _expected_norm(layer), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)  # merge runs in float32
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B, layer.magnitude], lr=0.1)
    model(x).pow(2).sum().backward()
    opt.step()
    torch.testing.assert_close(layer.row_norm(), _expected_norm(layer), rtol=1e-12, atol=1e-12)


def test_pissa_residual_shift_is_seen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT)).double()
    peftkit.apply(model, DoRAConfig(r=RANK, alpha=ALPHA, init="pissa", targets=["0"]))
    layer = model[0]
    layer.row_norm()
    layer.restore_base()  # W0 - s B0 A0 -> W0, in place
    torch.testing.assert_close(layer.row_norm(), _expected_norm(layer), rtol=1e-12, atol=1e-12)


def test_a_copy_starts_without_the_cache_and_follows_its_own_base():
    _, layer = _dora_layer()
    layer.row_norm()
    twin = copy.deepcopy(layer)
    assert twin._base_norm.value is None
    with torch.no_grad():
        twin.base.weight.mul_(2)
    torch.testing.assert_close(twin.row_norm(), _expected_norm(twin), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.row_norm(), _expected_norm(layer), rtol=1e-12, atol=1e-12)


def test_bf16_autocast_runs_and_stays_close_to_float32():
    model, layer = _dora_layer(bias=True, dtype=torch.float32)
    x = torch.randn(4, D_IN)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert layer.magnitude.grad is not None and torch.isfinite(layer.magnitude.grad).all()
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
