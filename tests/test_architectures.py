"""Architecture coverage (issue 13): module roles per family, fused q/k/v splits, default targets of the
methods that declare them as roles, and the position limits of the prompt methods.

Tiny models of each family are built from configs (tests/tiny_models.py); every check runs in seconds.
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core import architectures, weights
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.dept import DePTConfig
from peftkit.methods.difffit import DiffFitConfig
from peftkit.methods.hydra import HydraConfig
from peftkit.methods.llama_adapter import LlamaAdapterConfig
from peftkit.methods.lofit import LoFiTConfig
from peftkit.methods.p_tuning import PTuningConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig

from tiny_models import (
    ARCHITECTURES,
    MODELS,
    example_inputs,
    output_of,
    tiny_falcon,
    tiny_gpt2,
    tiny_vit,
)

FUSED = {  # model -> (builder, example-input kind)
    "gpt_neox": (MODELS["gpt_neox"], "gpt_neox"),  # interleaved per head
    "bloom": (MODELS["bloom"], "bloom"),  # interleaved per head, ALiBi
    "phi3": (MODELS["phi3"], "phi3"),  # q | k | v with 2 key/value heads
    "falcon-multi-query": (tiny_falcon, "falcon"),  # q | k | v with one key/value head
    "falcon-grouped": (lambda seed=0: tiny_falcon(seed, new_decoder_architecture=True), "falcon"),
    "gpt2": (tiny_gpt2, "gpt2"),  # Conv1D, q | k | v
    "peftkit-vit": (tiny_vit, "vit"),  # timm's qkv
}


def _sharpened(build, name: str):
    """The model with its q/k/v weights x 30: attention far from uniform, so zeroed queries change the output."""
    model = build()
    module = model.get_submodule(name)
    weights.set_weight(module, weights.get_weight(module) * 30)
    return model


def _zero_rows(model, name: str, rows: torch.Tensor | None) -> None:
    """Zero output rows `rows` (None: all) of a linear layer's weight and bias."""
    module = model.get_submodule(name)
    w = weights.get_weight(module).clone()
    bias = weights.get_bias(module)
    with torch.no_grad():
        if rows is None:
            w.zero_()
        else:
            w[rows] = 0
            if bias is not None:
                bias[rows] = 0
        weights.set_weight(module, w)


@pytest.mark.parametrize("key", FUSED)
def test_fused_qkv_rows_are_the_models_own_split(key):
    """Zeroing the query rows or the key rows gives the same uniform attention, and zeroing the value rows
    the same output as zeroing the attention output projection: true only for the model's real layout."""
    build, kind = FUSED[key]
    qkv, out = (architectures.modules_with_role(build(), r)[0] for r in ("qkv", "attn-out"))
    base = _sharpened(build, qkv)
    rows = architectures.qkv_rows(base, qkv)
    assert sorted(torch.cat(list(rows.values())).tolist()) == list(range(weights.in_out_features(
        base.get_submodule(qkv))[1]))
    inputs = example_inputs(kind)
    outputs = {}
    for part, name, which in (("query", qkv, rows["query"]), ("key", qkv, rows["key"]), ("value", qkv, rows["value"]),
                              ("out", out, None)):
        model = _sharpened(build, qkv)
        _zero_rows(model, name, which)
        with torch.no_grad():
            outputs[part] = output_of(model, inputs)
    with torch.no_grad():
        plain = output_of(base, inputs)
    torch.testing.assert_close(outputs["query"], outputs["key"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["value"], outputs["out"], atol=1e-5, rtol=0)
    assert not torch.allclose(outputs["query"], plain, atol=1e-4)


def test_fused_split_sizes_follow_the_config():
    phi3 = MODELS["phi3"]()  # 4 query heads, 2 key/value heads of 8
    rows = architectures.qkv_rows(phi3, "model.layers.0.self_attn.qkv_proj")
    assert [len(rows[r]) for r in architectures.PROJECTIONS] == [32, 16, 16]
    neox = MODELS["gpt_neox"]()  # per head [q_h, k_h, v_h], 8 wide each
    rows = architectures.qkv_rows(neox, "gpt_neox.layers.0.attention.query_key_value")
    assert rows["query"][:10].tolist() == [*range(8), 24, 25] and rows["key"][0] == 8 and rows["value"][0] == 16


EXPECTED_ROLES = {  # model -> (attention output, MLP down) of block 0
    "gpt_neox": ("gpt_neox.layers.0.attention.dense", "gpt_neox.layers.0.mlp.dense_4h_to_h"),
    "phi3": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "qwen2": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "gemma2": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "opt": ("model.decoder.layers.0.self_attn.out_proj", "model.decoder.layers.0.fc2"),
    "bloom": ("transformer.h.0.self_attention.dense", "transformer.h.0.mlp.dense_4h_to_h"),
    "falcon": ("transformer.h.0.self_attention.dense", "transformer.h.0.mlp.dense_4h_to_h"),
    "roberta": ("roberta.encoder.layer.0.attention.output.dense", "roberta.encoder.layer.0.output.dense"),
    "deberta_v2": ("deberta.encoder.layer.0.attention.output.dense", "deberta.encoder.layer.0.output.dense"),
    "t5": ("encoder.block.0.layer.0.SelfAttention.o", "encoder.block.0.layer.1.DenseReluDense.wo"),
    "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"),
    "bert": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"),
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "vit": ("blocks.0.attn.proj", "blocks.0.mlp.fc2"),
}


@pytest.mark.parametrize("kind", EXPECTED_ROLES)
def test_roles_find_each_familys_attention_output_and_mlp_down(kind):
    model = MODELS[kind]()
    attn_out, mlp_down = EXPECTED_ROLES[kind]
    found_out, found_down = (architectures.modules_with_role(model, r) for r in ("attn-out", "mlp-down"))
    assert attn_out in found_out and mlp_down in found_down
    assert not set(found_out) & set(found_down)
    assert len(found_down) == 4 if kind == "t5" else len(found_down) == 2  # 2 blocks (T5: 2 encoder + 2 decoder)


def test_unknown_model_falls_back_to_every_familys_names():
    """A model without a known config.model_type is resolved by name patterns (here GPT-NeoX's)."""
    model = MODELS["gpt_neox"]()
    model.config.model_type = "my-neox-fork"
    assert architectures.modules_with_role(model, "attn-out") == [f"gpt_neox.layers.{i}.attention.dense"
                                                                  for i in range(2)]
    with pytest.raises(peftkit.ConfigError, match="cannot tell how .*query_key_value.* splits"):
        architectures.qkv_rows(model, "gpt_neox.layers.0.attention.query_key_value")


def test_unknown_role_lists_the_roles():
    with pytest.raises(peftkit.ConfigError, match="unknown role 'role:attn_out'.*role:attn-out"):
        peftkit.apply(MODELS["llama"](), HydraConfig(targets=["role:attn_out"]))


ROLE_DEFAULTS = [peftkit.IA3Config, HydraConfig, DiffFitConfig, BottleneckConfig, LoFiTConfig]


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("config_cls", ROLE_DEFAULTS, ids=lambda c: c.method)
def test_role_defaults_apply_on_every_new_family(kind, config_cls):
    """(IA)^3, Hydra, DiffFit, bottleneck adapters and LoFiT said "no module matched" on GPT-NeoX & co."""
    model = MODELS[kind]()
    if (config_cls.method, kind) == ("lofit", "t5"):  # two attention outputs per decoder block
        with pytest.raises(peftkit.ConfigError, match="LoFiT adapts one attention output per block.*T5"):
            peftkit.apply(model, config_cls())
        return
    peftkit.apply(model, config_cls())
    adapted = peftkit.core.apply.get_state(model).adapted
    attn_out, mlp_down = EXPECTED_ROLES[kind]
    assert attn_out in adapted or mlp_down in adapted
    with torch.no_grad():
        assert torch.isfinite(output_of(model, example_inputs(kind))).all()


@pytest.mark.parametrize("kind", ["gpt_neox", "phi3", "bloom", "falcon", "gpt2"])
def test_ia3_scales_only_keys_and_values_of_a_fused_projection(kind):
    """(IA)^3's default scales k and v: on a fused projection only their rows, laid out as the family does."""
    model = MODELS[kind]()
    peftkit.apply(model, peftkit.IA3Config())
    (qkv, *_) = architectures.modules_with_role(model, "qkv")
    layer = model.get_submodule(qkv)
    rows = architectures.qkv_rows(model, qkv)
    assert layer.ia3_l.numel() == len(rows["key"]) + len(rows["value"])
    with torch.no_grad():
        layer.ia3_l.fill_(2.0)
        scale = layer.scale()
    assert torch.equal(scale[rows["query"]], torch.ones(len(rows["query"])))
    assert (scale[rows["key"]] == 2).all() and (scale[rows["value"]] == 2).all()


def test_ia3_named_fused_projection_is_scaled_whole_as_peft():
    model = tiny_gpt2()
    peftkit.apply(model, peftkit.IA3Config(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]))
    assert model.transformer.h[0].attn.c_attn.ia3_l.shape == (96, 1)


def test_ia3_fused_split_saves_loads_and_merges(tmp_path):
    model = MODELS["gpt_neox"]()
    inputs = example_inputs("gpt_neox")
    peftkit.apply(model, peftkit.IA3Config())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        expected = output_of(model, inputs)
    peftkit.save(model, tmp_path)
    fresh = peftkit.load(MODELS["gpt_neox"](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, inputs), expected, atol=1e-6, rtol=0)
        peftkit.merge(fresh)
        torch.testing.assert_close(output_of(fresh, inputs), expected, atol=1e-5, rtol=0)


def test_llama_adapter_refuses_other_attention_naming_method_and_architecture():
    with pytest.raises(peftkit.ConfigError, match="llama-adapter .*Phi3Attention of a phi3 model.*qkv_proj"):
        peftkit.apply(MODELS["phi3"](), LlamaAdapterConfig())
    with pytest.raises(peftkit.ConfigError, match="llama-adapter .*GPTNeoXAttention of a gpt_neox model.*query_key_v"):
        peftkit.apply(MODELS["gpt_neox"](), LlamaAdapterConfig())


def test_llama_adapter_uses_gemma2_query_scale():
    model = MODELS["gemma2"]()
    peftkit.apply(model, LlamaAdapterConfig(adapter_len=2))
    layer = model.model.layers[0].self_attn
    assert layer.scaling == model.config.query_pre_attn_scalar ** -0.5


def test_missing_role_names_method_and_architecture():
    with pytest.raises(peftkit.ConfigError, match="no module matched .* of adapter in OPTForCausalLM .*OPT.*"
                                                  "no module with role role:mlp"):
        peftkit.apply(MODELS["opt"](), BottleneckConfig(kind="parallel"))


# --- prompt methods and absolute positions ----------------------------------------------------------------

PROMPTS = {
    "prompt-tuning": lambda n: peftkit.PromptTuningConfig(num_virtual_tokens=n),
    "p-tuning": lambda n: PTuningConfig(num_virtual_tokens=n, encoder_hidden=8),
    "prefix-tuning": lambda n: PrefixTuningConfig(num_virtual_tokens=n),
    "dept": lambda n: DePTConfig(num_virtual_tokens=n, r=2, max_length=8),
}
LIMITS = {"gpt2": 128, "bert": 128, "opt": 128, "roberta": 126}  # RoBERTa counts from padding_idx + 1


@pytest.mark.parametrize("kind", sorted(LIMITS))
@pytest.mark.parametrize("method", PROMPTS)
def test_prompt_plus_sequence_beyond_positions_is_a_clear_error(method, kind):
    """Virtual tokens + tokens past the position table raised IndexError mid-forward; now the exact limit
    runs and one more token is a ConfigError naming the lengths and what to do."""
    n, limit = 5, LIMITS[kind]
    model = peftkit.apply(MODELS[kind](), PROMPTS[method](n))
    with torch.no_grad():
        output_of(model, example_inputs(kind, batch=1, seq=limit - n))
        with pytest.raises(peftkit.ConfigError, match=f"{method}: {n} virtual tokens \\+ {limit - n + 1} input "
                                                      f"tokens = {limit + 1} positions.*{limit} absolute.*"
                                                      f"max_length <= {limit - n}"):
            output_of(model, example_inputs(kind, batch=1, seq=limit - n + 1))


@pytest.mark.parametrize("method", PROMPTS)
def test_prompt_as_long_as_the_positions_is_refused_at_apply(method):
    model = tiny_gpt2()
    message = "a prefix of 128 tokens does not fit" if method == "prefix-tuning" else f"{method}: 128 virtual tokens"
    with pytest.raises(peftkit.ConfigError, match=message):
        peftkit.apply(model, PROMPTS[method](128) if method != "dept" else DePTConfig(num_virtual_tokens=128, r=2,
                                                                                         max_length=8))
    assert not peftkit.has_adapter(model) and not any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())


def test_dept_prompt_plus_max_length_beyond_positions_is_refused_at_apply():
    """DePT pads inputs to max_length: m + s beyond GPT-2's / BERT's positions cannot run as configured."""
    for kind in ("gpt2", "bert"):
        with pytest.raises(peftkit.ConfigError, match="dept: 60 virtual tokens \\+ max_length 256 .*need 316 "
                                                      "positions.*128 absolute"):
            peftkit.apply(MODELS[kind](), DePTConfig())
    peftkit.apply(MODELS["gpt2"](), DePTConfig(num_virtual_tokens=28, r=2, max_length=100))  # 128: fits exactly


def test_rotary_models_only_refuse_a_prompt_as_long_as_the_declared_positions():
    """Llama (rotary) has no position table: a long input is the model's business, not an IndexError."""
    model = peftkit.apply(MODELS["llama"](), peftkit.PromptTuningConfig(num_virtual_tokens=5))
    with torch.no_grad():
        output_of(model, example_inputs("llama", batch=1, seq=130))
    with pytest.raises(peftkit.ConfigError, match="128 virtual tokens reach"):
        peftkit.apply(MODELS["llama"](), peftkit.PromptTuningConfig(num_virtual_tokens=128))


def test_generation_past_the_positions_is_a_clear_error():
    model = peftkit.apply(tiny_gpt2(), peftkit.PromptTuningConfig(num_virtual_tokens=5))
    ids = example_inputs("gpt2", batch=1, seq=120)["input_ids"]
    with pytest.raises(peftkit.ConfigError, match="absolute positions"):
        model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)


def test_position_limits():
    assert architectures.position_limit(tiny_gpt2()) == (128, True)
    assert architectures.position_limit(MODELS["opt"]()) == (128, True)  # the table has 130 rows, offset 2
    assert architectures.position_limit(MODELS["roberta"]()) == (126, True)
    assert architectures.position_limit(MODELS["llama"]()) == (128, False)
    assert architectures.position_limit(MODELS["t5"]()) is None


def test_prefix_tuning_refuses_an_encoder_decoder_at_apply():
    """T5 failed mid-forward with transformers' "specify exactly one of input_ids or inputs_embeds"."""
    model = MODELS["t5"]()
    # the default target, input-embeddings, is refused first on T5 (its stacks call tied copies of `shared`)
    with pytest.raises(peftkit.ConfigError, match="input embeddings 'shared' .* share their weight"):
        peftkit.apply(model, PrefixTuningConfig(num_virtual_tokens=3))
    with pytest.raises(peftkit.ConfigError, match="prefix-tuning .*T5ForConditionalGeneration.*encoder-decoder"):
        peftkit.apply(model, PrefixTuningConfig(num_virtual_tokens=3, targets=["encoder.embed_tokens"]))
    assert not peftkit.has_adapter(model)


class _SharedEmbedding(torch.nn.Module):
    """One embedding module under two names (as older transformers' T5 held `shared` and `encoder.embed_tokens`);
    the forward calls it through the second name only."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Embedding(50, 8)
        self.encoder = torch.nn.Module()
        self.encoder.embed_tokens = self.shared
        self.head = torch.nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.encoder.embed_tokens(ids))


def test_a_module_shared_under_several_names_is_adapted_under_all_of_them():
    """`named_modules` lists a shared module once; an adapter put under that one name only had no effect."""
    torch.manual_seed(0)
    model, ids = _SharedEmbedding(), torch.randint(0, 50, (2, 5))
    base = model(ids)
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["shared"]))
    layer = model.shared
    assert model.encoder.embed_tokens is layer
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    adapted = model(ids)
    assert not torch.allclose(adapted, base, atol=1e-4)
    peftkit.merge(model)
    torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)
    peftkit.unmerge(model)
    plain = peftkit.unload(model)
    assert plain.encoder.embed_tokens is plain.shared and isinstance(plain.shared, torch.nn.Embedding)
    torch.testing.assert_close(plain(ids), base, atol=1e-5, rtol=1e-5)


def test_input_embeddings_that_the_forward_calls_through_tied_copies_are_refused():
    """T5's get_input_embeddings() is `shared`; its stacks call `embed_tokens` modules tied to it, so an adapter on
    `shared` would do nothing: refused, naming the modules to target instead, which work."""
    model = MODELS["t5"](0)
    with pytest.raises(peftkit.ConfigError, match="share their weight with encoder.embed_tokens"):
        peftkit.apply(model, peftkit.LoRAConfig(r=2, targets="input-embeddings"))
    inputs = example_inputs("t5")
    base = output_of(model, inputs)
    peftkit.apply(model, peftkit.LoRAConfig(r=2, targets=["encoder.embed_tokens"]))
    with torch.no_grad():
        model.encoder.embed_tokens.lora_A.normal_()
        model.encoder.embed_tokens.lora_B.normal_()
    assert not torch.allclose(output_of(model, inputs), base, atol=1e-4)
