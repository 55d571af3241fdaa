"""Bottleneck adapters (series Houlsby/Pfeiffer, parallel) and LLaMA-Adapter against hand-written references.

Every reference below is written from the papers' equations with plain tensor ops (float64 where it
matters), never by calling the implementation; peft's `adaption_prompt` is the interop reference.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.core.layer import adapter_layers
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.llama_adapter import LlamaAdapterConfig

from tiny_models import MODELS, example_inputs, output_of, tiny_llama

ACT = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _randomize(params, seed: int = 0, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _adapter_params(layer) -> list[torch.Tensor]:
    return [layer.adapter_down, layer.adapter_down_bias, layer.adapter_up, layer.adapter_up_bias]


def _bottleneck_reference(h, y, down, down_bias, up, up_bias, s, act):
    """y + s (U f(D h + b_D) + b_U), written out."""
    return y + s * (ACT[act](h @ down.T + down_bias) @ up.T + up_bias)


def _check_against_reference(model, x, reference_fn, layer) -> None:
    """Forward and every gradient (input and adapter parameters) against `reference_fn(x, *params)`."""
    params = _adapter_params(layer)
    x1 = x.clone().requires_grad_(True)
    out = model(x1)
    refs = [p.detach().clone().requires_grad_(True) for p in params]
    x2 = x.clone().requires_grad_(True)
    expected = reference_fn(x2, *refs)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    for got, want in zip([x1, *params], [x2, *refs], strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-12, rtol=0)


# --- bottleneck adapters: math ------------------------------------------------------------------
@pytest.mark.parametrize("act", list(ACT))
def test_series_adapter_matches_reference(act):
    """Houlsby/Pfeiffer: h <- h + s (U f(D h + b_D) + b_U) on the OUTPUT h of the wrapped layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.apply(model, BottleneckConfig(kind="houlsby", targets=["0"], bottleneck=3, activation=act, scaling=0.7))
    layer = model[0]
    assert layer.adapter_down.shape == (3, 5) and layer.adapter_up.shape == (5, 3)
    _randomize(_adapter_params(layer))

    def reference(x, *params):
        y = x @ w.T + b
        return _bottleneck_reference(y, y, *params, 0.7, act)

    _check_against_reference(model, torch.randn(4, 2, 6, dtype=torch.float64), reference, layer)


class _Block(nn.Module):
    """A residual-free block whose `mlp` is the parallel adapter's target."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6))

    def forward(self, x):
        return self.mlp(x)


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_parallel_adapter_matches_reference(act):
    """Parallel: out = MLP(x) + s (U f(D x + b_D) + b_U), fed by the MLP block's INPUT x."""
    torch.manual_seed(0)
    model = _Block().double()
    fc1, fc2 = model.mlp[0], model.mlp[2]
    peftkit.apply(model, BottleneckConfig(kind="parallel", bottleneck=4, activation=act, scaling=2.0))
    assert model.peftkit_state.adapted == ["mlp"]
    layer = model.mlp
    _randomize(_adapter_params(layer))

    def reference(x, *params):
        mlp_out = F.gelu(x @ fc1.weight.detach().T + fc1.bias.detach()) @ fc2.weight.detach().T + fc2.bias.detach()
        return _bottleneck_reference(x, mlp_out, *params, 2.0, act)

    _check_against_reference(model, torch.randn(3, 6, dtype=torch.float64), reference, layer)


def test_parallel_adapter_on_a_layer_of_different_widths():
    """A parallel adapter on one linear layer maps its d_in input to its d_out output: D (m, d_in), U (d_out, m)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    peftkit.apply(model, BottleneckConfig(kind="parallel", targets=["0"], bottleneck=2))
    layer = model[0]
    assert layer.adapter_down.shape == (2, 6) and layer.adapter_up.shape == (5, 2)
    _randomize(_adapter_params(layer))
    _check_against_reference(model, torch.randn(3, 6, dtype=torch.float64),
                             lambda x, *p: _bottleneck_reference(x, x @ w.T + b, *p, 1.0, "relu"), layer)


# --- bottleneck adapters: placement, identity, counts -----------------------------------------
EXPECTED_TARGETS = {
    ("houlsby", "llama"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
    ("houlsby", "gpt2"): ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"],
    ("houlsby", "bert"): ["bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"],
    ("pfeiffer", "llama"): ["model.layers.{i}.mlp.down_proj"],
    ("pfeiffer", "gpt2"): ["transformer.h.{i}.mlp.c_proj"],
    ("pfeiffer", "bert"): ["bert.encoder.layer.{i}.output.dense"],
    ("parallel", "llama"): ["model.layers.{i}.mlp"],
    ("parallel", "gpt2"): ["transformer.h.{i}.mlp"],
}


@pytest.mark.parametrize("kind, model_name", EXPECTED_TARGETS, ids=[f"{k}-{m}" for k, m in EXPECTED_TARGETS])
def test_default_placement_identity_and_count(kind, model_name):
    """Default targets per architecture; exact identity at init; 2dm + m + d per adapter (d = 32, m = 4)."""
    model = MODELS[model_name]()
    inputs = example_inputs(model_name)
    with torch.no_grad():
        base = output_of(model, inputs)
    peftkit.apply(model, BottleneckConfig(kind=kind, bottleneck=4))
    expected = [t.format(i=i) for i in range(2) for t in EXPECTED_TARGETS[kind, model_name]]
    assert model.peftkit_state.adapted == expected
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)
    assert peftkit.trainable_parameters(model).trainable == len(expected) * (2 * 32 * 4 + 4 + 32)


def test_zero_up_projection_gives_zero_down_gradient_at_init():
    model = tiny_llama()
    peftkit.apply(model, BottleneckConfig(kind="houlsby", bottleneck=4))
    output_of(model, example_inputs("llama")).pow(2).mean().backward()
    layer = model.model.layers[1].mlp.down_proj
    assert torch.count_nonzero(layer.adapter_down.grad) == 0 and torch.count_nonzero(layer.adapter_up.grad) > 0


def test_fp32_adapters_on_a_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    peftkit.apply(model, BottleneckConfig(kind="parallel", bottleneck=4))
    layer = model.model.layers[0].mlp
    assert layer.adapter_up.dtype == torch.float32
    _randomize(_adapter_params(layer))
    out = output_of(model, example_inputs("llama"))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert layer.adapter_down.grad.dtype == torch.float32 and torch.count_nonzero(layer.adapter_down.grad) > 0


# --- bad configurations raise at construction or apply time, leaving the model as it was -------
@pytest.mark.parametrize("kwargs, match", [
    ({"bottleneck": 0}, "bottleneck size must be a positive integer"),
    ({"bottleneck": 2.5}, "bottleneck size must be a positive integer"),
    ({"kind": "serial"}, "unknown adapter kind 'serial'; choose one of houlsby, pfeiffer, parallel"),
    ({"activation": "swish"}, "unknown activation 'swish'"),
    ({"scaling": float("nan")}, "scaling must be a finite number"),
])
def test_bad_bottleneck_config_values(kwargs, match):
    with pytest.raises(peftkit.ConfigError, match=match):
        BottleneckConfig(**kwargs)


def _fails_to_apply(model_name, cfg, match, error=peftkit.ConfigError):
    model = MODELS[model_name]()
    types = [type(m).__name__ for m in model.modules()]
    with pytest.raises(error, match=match):
        peftkit.apply(model, cfg)
    assert [type(m).__name__ for m in model.modules()] == types and not peftkit.has_adapter(model)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_bottleneck_target_block_that_is_not_there():
    _fails_to_apply("llama", BottleneckConfig(kind="pfeiffer", targets=["mlp.down_proj", "mlp.c_proj"]),
                    r"target\(s\) \['mlp.c_proj'\] match no module of LlamaForCausalLM; .*down_proj")
    _fails_to_apply("llama", BottleneckConfig(kind="houlsby", layers=[1, 4]), r"layers \[4\] do not exist.*0..1")
    _fails_to_apply("bert", BottleneckConfig(kind="parallel"),
                    "no module matched targets \\['role:mlp'\\].* of adapter in BertForSequenceClassification")


# --- LLaMA-Adapter ------------------------------------------------------------------------------
def _llama(kv_heads: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=kv_heads, vocab_size=100, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _rotate(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _attention_reference(attn, h, cos, sin, prompt, gate):
    """Causal self-attention plus g softmax(q P^T W_k^T / sqrt(hd)) P W_v^T, then W_o, written out per head."""
    b, s, _ = h.shape
    hd, n_heads = attn.head_dim, attn.config.num_attention_heads
    n_kv = attn.config.num_key_value_heads

    def heads(t, n):  # (b, s, n hd) -> (b, n, s, hd)
        return t.view(t.shape[0], t.shape[1], n, hd).transpose(1, 2)

    q = heads(h @ attn.q_proj.weight.T, n_heads)
    k = heads(h @ attn.k_proj.weight.T, n_kv)
    v = heads(h @ attn.v_proj.weight.T, n_kv)
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
    kp = heads((prompt @ attn.k_proj.weight.T)[None], n_kv)[0]  # (n_kv, K, hd), no rotation
    vp = heads((prompt @ attn.v_proj.weight.T)[None], n_kv)[0]
    out = torch.zeros(b, n_heads, s, hd, dtype=h.dtype)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for head in range(n_heads):
        kv = head * n_kv // n_heads  # grouped-query: consecutive query heads share a key head
        scores = (q[:, head] @ k[:, kv].transpose(-1, -2)) / hd**0.5
        out[:, head] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, kv]
        out[:, head] += gate * ((q[:, head] @ kp[kv].T) / hd**0.5).softmax(-1) @ vp[kv]
    return out.transpose(1, 2).reshape(b, s, -1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_llama_adapter_attention_matches_reference(kv_heads):
    model = _llama(kv_heads).double()
    peftkit.apply(model, LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    layer = model.model.layers[1].self_attn
    _randomize([layer.adaption_prompt])
    with torch.no_grad():
        layer.adaption_gate.fill_(0.8)
    seen = {}
    layer.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs, out=out[0]), with_kwargs=True)
    with torch.no_grad():
        model(**example_inputs("llama"))
    cos, sin = seen["position_embeddings"]
    expected = _attention_reference(layer.base, seen["hidden_states"], cos, sin, layer.adaption_prompt[0], 0.8)
    torch.testing.assert_close(seen["out"], expected, atol=1e-12, rtol=0)


def test_llama_adapter_top_layers_identity_and_gradients():
    model = tiny_llama()
    inputs = example_inputs("llama")
    with torch.no_grad():
        base = output_of(model, inputs)
    peftkit.apply(model, LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    assert model.peftkit_state.adapted == ["model.layers.1.self_attn"]
    assert peftkit.trainable_parameters(model).trainable == 1 * 3 * 32 + 1  # L K d + L
    out = output_of(model, inputs)
    assert torch.equal(out, base)
    out.pow(2).mean().backward()
    layer = model.model.layers[1].self_attn
    assert torch.count_nonzero(layer.adaption_prompt.grad) == 0 and layer.adaption_gate.grad.abs() > 0
    every = peftkit.apply(tiny_llama(), LlamaAdapterConfig(adapter_len=2))
    assert every.peftkit_state.adapted == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def _greedy_by_full_recompute(model, ids, n):
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("cfg", [LlamaAdapterConfig(adapter_len=3), BottleneckConfig(kind="houlsby", bottleneck=4)],
                         ids=["llama-adapter", "bottleneck"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_generate_with_cache(cfg, kv_heads):
    model = peftkit.apply(_llama(kv_heads), cfg)
    _randomize([p for p in model.parameters() if p.requires_grad], scale=1.0)
    ids = example_inputs("llama")["input_ids"]
    cached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, _greedy_by_full_recompute(model, ids, 4))
    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
    assert past.get_seq_length() == ids.shape[1]  # the prompt keys stay out of the KV cache


def test_bad_llama_adapter_configs():
    with pytest.raises(peftkit.ConfigError, match="adapter_len must be a positive integer"):
        LlamaAdapterConfig(adapter_len=0)
    with pytest.raises(peftkit.ConfigError, match="adapter_layers must be a positive integer or None"):
        LlamaAdapterConfig(adapter_layers=0)
    _fails_to_apply("llama", LlamaAdapterConfig(adapter_layers=3), "adapter_layers=3 but the model has 2 layers")
    _fails_to_apply("gpt2", LlamaAdapterConfig(targets="attn"), "llama-adapter wraps Llama-style attention.*GPT2Attention")
    _fails_to_apply("gpt2", LlamaAdapterConfig(), "llama-adapter wraps Llama-style attention.*GPT2Attention.*c_attn")


# --- interop with Hugging Face peft's adaption_prompt ----------------------------------------------
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_peft_adaption_prompt_round_trips(kv_heads, tmp_path):
    peft = pytest.importorskip("peft")
    warnings.simplefilter("ignore")
    inputs = example_inputs("llama")
    ours = peftkit.apply(_llama(kv_heads), LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    _randomize([p for p in ours.parameters() if p.requires_grad])
    peftkit.save(ours, tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(_llama(kv_heads), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = output_of(ours, inputs)
        assert not torch.allclose(expected, output_of(_llama(kv_heads), inputs), atol=1e-3)
        torch.testing.assert_close(output_of(theirs, inputs), expected, atol=1e-5, rtol=0)
    ids = inputs["input_ids"]
    assert torch.equal(theirs.generate(input_ids=ids, max_new_tokens=3, do_sample=False),
                       ours.generate(input_ids=ids, max_new_tokens=3, do_sample=False))

    written = peft.get_peft_model(_llama(kv_heads), peft.AdaptionPromptConfig(
        adapter_len=2, adapter_layers=2, task_type="CAUSAL_LM")).eval()
    _randomize([p for p in written.parameters() if p.requires_grad], seed=1)
    written.save_pretrained(tmp_path / "theirs")
    loaded = peftkit.load(_llama(kv_heads), tmp_path / "theirs")
    assert loaded.peftkit_state.config.adapter_len == 2 and len(loaded.peftkit_state.adapted) == 2
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, inputs), output_of(written, inputs), atol=1e-5, rtol=0)


def test_peft_export_refuses_a_layer_set_peft_cannot_express(tmp_path):
    model = peftkit.apply(tiny_llama(), LlamaAdapterConfig(adapter_len=2, layers=[0]))
    with pytest.raises(peftkit.ConfigError, match="peft adapts the top 1 modules named 'self_attn'"):
        peftkit.save(model, tmp_path, format="peft")


# --- SmolLM2-135M (skipped when its converted copy is not cached) --------------------------------
SMOLLM2 = Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit") / "smollm2-135m-instruct"


@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason="SmolLM2-135M is not cached")
def test_llama_adapter_on_smollm2():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 216]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    peftkit.apply(model, LlamaAdapterConfig(adapter_len=4, adapter_layers=2))
    assert model.peftkit_state.adapted == ["model.layers.28.self_attn", "model.layers.29.self_attn"]
    assert peftkit.trainable_parameters(model).trainable == 2 * 4 * 576 + 2
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)
        for layer in adapter_layers(model).values():
            layer.adaption_gate.fill_(0.5)
        assert not torch.allclose(model(input_ids=ids).logits, base, atol=1e-3)
    cached = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, use_cache=True)
    assert torch.equal(cached, _greedy_by_full_recompute(model, ids, 2))
