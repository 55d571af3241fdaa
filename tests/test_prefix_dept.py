"""Prefix tuning, P-tuning and DePT against hand-written references (float64 where it matters).

The references are written from the papers' equations with plain tensor ops: attention over the
prefix keys/values with rotary positions computed by hand, the P-tuning encoders (MLP and an LSTM
loop), DePT's embedding update; never by calling the implementation. Round trips with Hugging Face
peft are in test_interop_prefix.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import peftkit
from peftkit.core.params import param_groups
from peftkit.methods.dept import DePTConfig, param_count
from peftkit.methods.p_tuning import PTuningConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.train.config import TrainConfig
from peftkit.train.loop import _build_optimizer

from tiny_models import MODELS, example_inputs, mlp, tiny_bert, tiny_gpt2, tiny_llama

N = 3  # virtual tokens in most tests
LAYERS = 2  # every tiny model has two blocks


def _llama(kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=kv_heads, vocab_size=100,
                                        max_position_embeddings=128, tie_word_embeddings=False)).eval()


def _randomize(params, seed: int = 0, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


# --- trainable-parameter formulas ---------------------------------------------------------------
def test_dept_budget_equals_prompt_tuning_for_the_papers_t5_base_numbers():
    d, s = 768, 256
    assert 100 * d == 76_800  # vanilla prompt tuning, l = 100
    assert param_count(d=d, m=60, r=30, s=s) == 60 * 768 + 256 * 30 + 30 * 768 == 76_800
    assert param_count(d=d, m=40, r=45, s=s) == 76_800
    assert param_count(d=d, m=60, r=31, s=s) != 76_800


@pytest.mark.parametrize("make, config, expected", [  # tiny Llama: L = 2, d = d_kv = 32 (GQA: d_kv = 16)
    (tiny_llama, PrefixTuningConfig(num_virtual_tokens=3), 2 * 2 * 3 * 32),
    (lambda: _llama(kv_heads=1), PrefixTuningConfig(num_virtual_tokens=3), 2 * 2 * 3 * 16),
    (tiny_llama, PrefixTuningConfig(num_virtual_tokens=3, projection=True, projection_hidden=8),
     3 * 32 + (32 * 8 + 8) + (8 * 128 + 128)),
    (tiny_llama, PTuningConfig(num_virtual_tokens=3, encoder_hidden=8), 3 * 32 + (32 * 8 + 8) + (8 * 8 + 8) + (8 * 32 + 32)),
    (tiny_llama, DePTConfig(num_virtual_tokens=2, r=3, max_length=10), 2 * 32 + 10 * 3 + 3 * 32),
], ids=["prefix", "prefix-gqa", "prefix-mlp", "p-tuning-mlp", "dept"])
def test_trainable_counts_on_tiny_models(make, config, expected):
    assert peftkit.trainable_parameters(peftkit.apply(make(), config)).trainable == expected


# --- prefix tuning: attention over the prefix, by hand --------------------------------------------
def _heads(x, n_heads):  # (b, t, n_heads hd) -> (b, n_heads, t, hd)
    return x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


def _rope(x, positions):
    """Rotary embedding of Llama (theta 10^4, rotate-half pairing) at the given positions, written out."""
    hd = x.shape[-1]
    angles = positions[:, None].double() / 10_000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _prefix_attention(q, k, v, prefix_k, prefix_v, key_mask, causal):
    """softmax(q [P_k ; k]^T / sqrt(hd) + mask) [P_v ; v]; q (b, H, t, hd), P (H_kv, n, hd) -> (b, t, H hd)."""
    b, n_heads, t, hd = q.shape
    repeat = n_heads // k.shape[1]  # grouped-query: consecutive query heads share a key/value head
    keys = torch.cat([prefix_k.expand(b, -1, -1, -1), k], 2).repeat_interleave(repeat, 1)
    values = torch.cat([prefix_v.expand(b, -1, -1, -1), v], 2).repeat_interleave(repeat, 1)
    n = prefix_k.shape[1]
    allowed = key_mask[:, None, None, :].clone()  # (b, 1, 1, n + t)
    if causal:
        allowed = allowed & torch.cat([torch.ones(t, n, dtype=torch.bool), torch.ones(t, t).tril().bool()], 1)
    scores = (q @ keys.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ values).transpose(1, 2).reshape(b, t, -1)


def _layer_prefix(prefix, layer: int, kv_heads: int):
    """Keys and values (H_kv, n, hd) of one layer from peft's (n, 2 L d_kv) layout: keys at 2l, values at 2l + 1."""
    per_token = prefix.view(prefix.shape[0], 2 * LAYERS, kv_heads, -1)
    return per_token[:, 2 * layer].transpose(0, 1), per_token[:, 2 * layer + 1].transpose(0, 1)


def _capture(module):
    seen = {}

    def hook(m, args, kwargs, out):
        seen.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"], out=out[0])

    module.register_forward_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("shift", [True, False], ids=["positions-after-prefix", "positions-from-0"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_prefix_attention_matches_reference_on_llama(shift, kv_heads):
    model = _llama(kv_heads).double()
    peftkit.apply(model, PrefixTuningConfig(num_virtual_tokens=N, shift_positions=shift))
    prefix = model.model.embed_tokens.prefix
    _randomize([prefix])
    attn = model.model.layers[1].self_attn
    seen = _capture(attn)
    inputs = example_inputs("llama")
    inputs["attention_mask"][1, :2] = 0  # a left-padded row: its pad keys are masked, the prefix is not
    with torch.no_grad():
        model(**inputs)
    h, t = seen["hidden"], inputs["input_ids"].shape[1]
    positions = torch.arange(t) + (N if shift else 0)
    q = _rope(_heads(h @ attn.q_proj.weight.T, 2), positions)
    k = _rope(_heads(h @ attn.k_proj.weight.T, kv_heads), positions)
    v = _heads(h @ attn.v_proj.weight.T, kv_heads)
    prefix_k, prefix_v = _layer_prefix(prefix.detach(), layer=1, kv_heads=kv_heads)
    key_mask = torch.cat([torch.ones(2, N, dtype=torch.bool), inputs["attention_mask"].bool()], 1)
    expected = _prefix_attention(q, k, v, prefix_k, prefix_v, key_mask, causal=True) @ attn.o_proj.weight.T
    torch.testing.assert_close(seen["out"], expected, atol=1e-9, rtol=0)  # the model's rotary angles are float32


def test_prefix_attention_matches_reference_on_bert():
    model = tiny_bert().double()
    peftkit.apply(model, PrefixTuningConfig(num_virtual_tokens=N))
    prefix = model.bert.embeddings.word_embeddings.prefix
    _randomize([prefix])
    attn = model.bert.encoder.layer[0].attention.self
    seen = _capture(attn)
    inputs = example_inputs("bert")
    inputs["attention_mask"][0, -1] = 0
    with torch.no_grad():
        model(**inputs)
    h, ids, emb = seen["hidden"], inputs["input_ids"], model.bert.embeddings
    # the real tokens are numbered after the prefix (the model counts the cache's n positions)
    by_hand = (emb.word_embeddings.base.weight[ids] + emb.position_embeddings.weight[N + torch.arange(6)]
               + emb.token_type_embeddings.weight[0])
    torch.testing.assert_close(h, emb.LayerNorm(by_hand), atol=1e-12, rtol=0)
    q, k, v = (_heads(lin(h), 2) for lin in (attn.query, attn.key, attn.value))
    prefix_k, prefix_v = _layer_prefix(prefix.detach(), layer=0, kv_heads=2)
    key_mask = torch.cat([torch.ones(2, N, dtype=torch.bool), inputs["attention_mask"].bool()], 1)
    expected = _prefix_attention(q, k, v, prefix_k, prefix_v, key_mask, causal=False)
    torch.testing.assert_close(seen["out"], expected, atol=1e-12, rtol=0)


def test_vocab_init_is_the_frozen_models_values_of_real_tokens():
    model = tiny_llama()
    peftkit.apply(model, PrefixTuningConfig(num_virtual_tokens=5))
    _, values = _layer_prefix(model.model.embed_tokens.prefix.detach(), layer=0, kv_heads=2)  # (H, n, hd)
    layer = model.model.layers[0]
    with torch.no_grad():  # layer 0's values of every vocabulary token: v_proj(RMSNorm(E)), no position involved
        candidates = layer.self_attn.v_proj(layer.input_layernorm(model.model.embed_tokens.base.weight))
    rows = values.transpose(0, 1).reshape(5, -1)  # (n, d_kv)
    distances = (rows[:, None] - candidates[None]).norm(dim=-1)  # (n, vocab)
    closest, words = distances.min(dim=1)
    assert closest.max() < 1e-5  # every prefix row is a real token's values
    # so at init a causal model sees exactly those words in front of its input
    ids = example_inputs("llama", batch=1)["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with peftkit.disabled(model):
            words_first = model(input_ids=torch.cat([words[None], ids], 1)).logits[:, 5:]
    torch.testing.assert_close(adapted, words_first, atol=1e-5, rtol=0)
    random = peftkit.apply(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=5, init="random"))
    assert abs(random.model.embed_tokens.prefix.std().item() - 1.0) < 0.1  # peft's N(0, 1)


def test_prefix_gets_gradients_and_leaves_outputs_length_unchanged():
    model = peftkit.apply(tiny_gpt2(), PrefixTuningConfig(num_virtual_tokens=N, projection=True))
    inputs = example_inputs("gpt2")
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape[1] == 6  # the prefix adds keys, not positions of the output
    out.loss.backward()
    layer = model.transformer.wte
    assert layer.prefix_embedding.grad.abs().sum() > 0 and layer.mlp[2].weight.grad.abs().sum() > 0


# --- generation ------------------------------------------------------------------------------------
def _greedy_by_full_recompute(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


GENERATING = {
    "prefix-llama": ("llama", lambda: PrefixTuningConfig(num_virtual_tokens=N)),
    "prefix-gqa-unshifted": ("gqa", lambda: PrefixTuningConfig(num_virtual_tokens=N, shift_positions=False)),
    "prefix-mlp-gpt2": ("gpt2", lambda: PrefixTuningConfig(num_virtual_tokens=N, projection=True)),
    "p-tuning-lstm-llama": ("llama", lambda: PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden=8)),
    "p-tuning-gpt2": ("gpt2", lambda: PTuningConfig(num_virtual_tokens=N)),
    "prompt-tuning-gpt2": ("gpt2", lambda: peftkit.PromptTuningConfig(num_virtual_tokens=N)),
    "dept-llama": ("llama", lambda: DePTConfig(num_virtual_tokens=2, r=2, max_length=8)),  # decoding crosses s
    "dept-gpt2": ("gpt2", lambda: DePTConfig(num_virtual_tokens=2, r=2, max_length=5)),
}


@pytest.mark.parametrize("kind, config", GENERATING.values(), ids=GENERATING.keys())
def test_greedy_generate_with_cache_equals_recompute(kind, config):
    base = _llama(kv_heads=1) if kind == "gqa" else MODELS[kind]()
    model = peftkit.apply(base, config())
    _randomize(_trainable(model), scale=1.0)
    ids = example_inputs("llama", batch=2)["input_ids"]
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 5, "do_sample": False,
              "pad_token_id": 0}
    cached = model.generate(**kwargs, use_cache=True)
    assert torch.equal(cached, model.generate(**kwargs, use_cache=False))
    assert torch.equal(cached, _greedy_by_full_recompute(model, ids, 5))


def test_prefix_stays_in_the_cache_while_decoding():
    model = peftkit.apply(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N))
    _randomize(_trainable(model))
    ids = example_inputs("llama", batch=1)["input_ids"]
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
        assert cache.get_seq_length() == N + 6
        prefix_k, prefix_v = _layer_prefix(model.model.embed_tokens.prefix, layer=1, kv_heads=2)
        torch.testing.assert_close(cache.layers[1].keys[0, :, :N], prefix_k, atol=0, rtol=0)
        torch.testing.assert_close(cache.layers[1].values[0, :, :N], prefix_v, atol=0, rtol=0)
        step = model(input_ids=torch.tensor([[7]]), cache=cache).logits[:, -1]  # one decoding step on the cache
        again = model(input_ids=torch.cat([ids, torch.tensor([[7]])], 1), use_cache=False).logits[:, -1]
    assert cache.get_seq_length() == N + 7
    torch.testing.assert_close(step, again, atol=1e-5, rtol=0)


# --- P-tuning: the encoders by hand ----------------------------------------------------------------
def _lstm_direction(x, w_ih, w_hh, b_ih, b_hh):
    """One direction of an LSTM over the rows of x (gates in PyTorch's order i, f, g, o)."""
    h = c = torch.zeros(w_hh.shape[1], dtype=x.dtype)
    outs = []
    for x_t in x:
        i, f, g, o = (x_t @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs)


def _p_tuning_prompt(layer):
    """P = f(E) for the MLP (Linear-ReLU-Linear-ReLU-Linear) or the 1-layer bidirectional LSTM + MLP head."""
    x, head = layer.inputs, layer.head
    if layer.lstm is not None:
        lstm = layer.lstm
        forward = _lstm_direction(x, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
        backward = _lstm_direction(x.flip(0), lstm.weight_ih_l0_reverse, lstm.weight_hh_l0_reverse,
                                   lstm.bias_ih_l0_reverse, lstm.bias_hh_l0_reverse).flip(0)
        x = torch.relu(torch.cat([forward, backward], -1) @ head[0].weight.T + head[0].bias)
        return x @ head[2].weight.T + head[2].bias
    for linear in (head[0], head[2]):
        x = torch.relu(x @ linear.weight.T + linear.bias)
    return x @ head[4].weight.T + head[4].bias


def _prompted_base_output(model, prompt, embeds, inputs, labels=None):
    """The base model (adapter disabled) on [P ; embeds] with the mask (and labels) padded by hand."""
    b, n = embeds.shape[0], prompt.shape[0]
    mask = torch.cat([torch.ones(b, n, dtype=torch.long), inputs["attention_mask"]], 1)
    extra = {} if labels is None else {"labels": torch.cat([torch.full((b, n), -100), labels], 1)}
    with torch.no_grad(), peftkit.disabled(model):
        return model(inputs_embeds=torch.cat([prompt.expand(b, -1, -1), embeds], 1), attention_mask=mask, **extra)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_prompt_matches_the_encoder_by_hand(encoder):
    model = tiny_llama().double()
    peftkit.apply(model, PTuningConfig(num_virtual_tokens=N, encoder=encoder, encoder_hidden=8, encoder_layers=1))
    layer = model.model.embed_tokens
    _randomize(_trainable(model))
    inputs = example_inputs("llama")
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        prompt = _p_tuning_prompt(layer)
    expected = _prompted_base_output(model, prompt, layer.base(inputs["input_ids"]), inputs, inputs["input_ids"])
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-10, rtol=0)


# --- DePT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_length", [8, 4], ids=["s-longer-than-input", "s-shorter-than-input"])
def test_dept_embedding_update_matches_reference(max_length):
    model = tiny_llama().double()
    peftkit.apply(model, DePTConfig(num_virtual_tokens=2, r=3, alpha=5.0, max_length=max_length))
    layer = model.model.embed_tokens
    _randomize(_trainable(model))
    inputs = example_inputs("llama")  # 6 tokens
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        update = (5.0 / math.sqrt(3)) * layer.lora_embedding_A @ layer.lora_embedding_B  # (s, d), alpha / sqrt(r)
        embeds = layer.base(inputs["input_ids"]).clone()
        rows = min(6, max_length)
        embeds[:, :rows] += update[:rows]  # positions from s on keep their embeddings
    expected = _prompted_base_output(model, layer.prompt, embeds, inputs, inputs["input_ids"])
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-10, rtol=0)


def test_dept_init_and_identity_without_prompt():
    model = tiny_llama()
    inputs = example_inputs("llama")
    with torch.no_grad():
        base = model(**inputs).logits
    peftkit.apply(model, DePTConfig(num_virtual_tokens=0, r=4, max_length=16))
    layer = model.model.embed_tokens
    a = layer.lora_embedding_A
    assert torch.count_nonzero(layer.lora_embedding_B) == 0
    assert a.abs().max() <= 1 / math.sqrt(4) and a.std() > 0.2  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(r))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base, atol=1e-6, rtol=0)  # B = 0 and m = 0
    model(**inputs).logits.pow(2).mean().backward()
    assert layer.lora_embedding_B.grad.abs().sum() > 0  # B trains first; A gets gradient once B moves


def test_dept_two_learning_rates_in_param_groups_and_the_training_loop(tmp_path):
    model = peftkit.apply(tiny_llama(), DePTConfig(num_virtual_tokens=2, r=2, max_length=8, prompt_lr=0.3,
                                                   embedding_lr=5e-3))
    layer = model.model.embed_tokens
    groups = param_groups(model, lr=1e-3)
    assert [(g["lr"], [id(p) for p in g["params"]]) for g in groups] == [
        (0.3, [id(layer.prompt)]), (5e-3, [id(layer.lora_embedding_A), id(layer.lora_embedding_B)])]
    optimizer = _build_optimizer(model, _trainable(model), None, TrainConfig(lr=1e-3, output_dir=str(tmp_path)))
    assert [g["lr"] for g in optimizer.param_groups] == [0.3, 5e-3]
    assert len(optimizer.param_groups[1]["params"]) == 2
    one = peftkit.apply(tiny_llama(), DePTConfig(num_virtual_tokens=2, r=2, max_length=8, embedding_lr=5e-3))
    assert [g["lr"] for g in param_groups(one, lr=0.3)] == [0.3, 5e-3]  # the prompt takes the training lr
    lora = peftkit.apply(tiny_llama(), peftkit.LoRAConfig(r=2))
    (group,) = param_groups(lora, lr=1e-3)  # methods that ask for nothing: one group, every trainable parameter
    assert group["lr"] == 1e-3 and [id(p) for p in group["params"]] == [id(p) for p in _trainable(lora)]


# --- bad configurations: clear errors at apply time, model left unchanged ---------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: PrefixTuningConfig(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
    (lambda: PrefixTuningConfig(init="text"), "unknown prefix init 'text'; choose vocab or random"),
    (lambda: PrefixTuningConfig(projection=True, projection_hidden=0), "projection_hidden must be a positive"),
    (lambda: PTuningConfig(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
    (lambda: PTuningConfig(encoder="gru"), "unknown P-tuning encoder 'gru'; choose mlp or lstm"),
    (lambda: PTuningConfig(encoder_dropout=1.5), r"encoder_dropout must be in \[0, 1\)"),
    (lambda: DePTConfig(num_virtual_tokens=-1), "num_virtual_tokens must be an integer >= 0"),
    (lambda: DePTConfig(r=0), "r must be an integer >= 1"),
    (lambda: DePTConfig(r=300, max_length=256), "r=300 exceeds max_length=256"),
    (lambda: DePTConfig(prompt_lr=-0.1), "prompt_lr must be a positive number or None"),
    (lambda: DePTConfig(init="text"), "init='text' needs init_text and tokenizer"),
])
def test_bad_config_values(make, match):
    with pytest.raises(peftkit.ConfigError, match=match):
        make()


def _fails_to_apply(model, config, match):
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    names = [type(m).__name__ for m in model.modules()]
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.apply(model, config)
    assert not peftkit.has_adapter(model) and [type(m).__name__ for m in model.modules()] == names
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


def test_prefix_longer_than_the_models_positions():
    _fails_to_apply(tiny_gpt2(), PrefixTuningConfig(num_virtual_tokens=128), "a prefix of 128 tokens does not fit "
                    "GPT2LMHeadModel's 128 positions; use num_virtual_tokens well below 128")


def test_prefix_needs_a_model_with_a_cache_and_without_gradient_checkpointing():
    _fails_to_apply(mlp(), PrefixTuningConfig(), "has no get_input_embeddings")
    checkpointed = tiny_llama()
    checkpointed.activation_checkpointing_enable()
    _fails_to_apply(checkpointed, PrefixTuningConfig(), "drops under gradient checkpointing")
    model = peftkit.apply(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N))
    model.activation_checkpointing_enable()  # turned on after apply: the first training forward says so
    model.train()
    with pytest.raises(RuntimeError, match="activation_checkpointing_disable"):
        model(**example_inputs("llama"))


def test_methods_without_a_peft_form_refuse_peft_export(tmp_path):
    dept = peftkit.apply(tiny_llama(), DePTConfig(num_virtual_tokens=2, r=2, max_length=8))
    with pytest.raises(peftkit.ConfigError, match="no Hugging Face peft equivalent"):
        peftkit.save(dept, tmp_path, format="peft")
    unshifted = peftkit.apply(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N, shift_positions=False))
    with pytest.raises(peftkit.ConfigError, match="export needs shift_positions=True"):
        peftkit.save(unshifted, tmp_path, format="peft")
    assert not list(tmp_path.iterdir())
