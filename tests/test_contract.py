"""The contract every registered method keeps, as one matrix: method x tiny model.

Each row says how to configure the method on a model, the closed-form trainable count, whether the
method is the identity at init / mergeable / can be disabled, and its tolerances. The checks are the
same for every row; there are no `if method == ...` branches. A registered method without a row
fails `test_every_registered_method_has_a_row`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import peftkit
from peftkit.core.apply import get_state
from peftkit.core.schedule import schedule_for
from peftkit.methods.adalora import AdaLoRAConfig
from peftkit.methods.bone import BoneConfig
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.dept import DePTConfig
from peftkit.methods.difffit import DiffFitConfig
from peftkit.methods.dsee import DSEEConfig
from peftkit.methods.hydra import HydraConfig
from peftkit.methods.increlora import IncreLoRAConfig
from peftkit.methods.kronecker import DiffuseKronAConfig
from peftkit.methods.llama_adapter import LlamaAdapterConfig
from peftkit.methods.lofit import LoFiTConfig
from peftkit.methods.loldu import LoLDUConfig
from peftkit.methods.p_tuning import PTuningConfig
from peftkit.methods.pego import PEGOConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.randlora import RandLoRAConfig
from peftkit.methods.selective import BitFitConfig, LNTuningConfig
from peftkit.methods.spiel import SpIELConfig
from peftkit.methods.ssf import SSFConfig
from peftkit.methods.svfit import SVFitConfig
from peftkit.methods.triadaptlora import TriAdaptLoRAConfig
from peftkit.methods.vqt import VQTConfig

from contract_counts import (  # noqa: F401  (the formulas the rows name)
    adalora_count,
    bias_count,
    bone_count,
    bottleneck_count,
    dept_count,
    difffit_count,
    dora_count,
    dsee_count,
    full_count,
    head_count,
    hydra_count,
    ia3_count,
    increlora_count,
    kron_count,
    llama_adapter_count,
    lofit_count,
    loldu_count,
    lora_count,
    norm_count,
    p_tuning_count,
    pego_count,
    prefix_count,
    prompt_count,
    randlora_count,
    spiel_count,
    spt_count,
    spt_planned,
    ssf_count,
    svfit_count,
    triadaptlora_count,
    vqt_count,
)
from tiny_models import MODELS, example_inputs, output_of


@dataclass
class Row:
    """One method on one tiny model."""

    config: Callable[[], peftkit.AdapterConfig]
    model: str
    count: Callable
    identity_at_init: bool = True
    mergeable: bool = True
    can_disable: bool = True
    trains_base: bool = False
    """The method keeps no copy of the base weights it trains (full fine-tuning): unload keeps them."""
    atol: float = 1e-5
    bf16: bool = True
    merge_adds_bias: bool = False
    """Merging gives bias-free layers a bias (LoFiT's W_o v on Llama): the merged, unloaded model has those keys."""
    id: str = ""
    extra: dict = field(default_factory=dict)


LLM = ("llama", "gpt2", "bert")

# The families of issue 13 (tests/tiny_models.py ARCHITECTURES): not the full cross product (it would
# triple the matrix's time), but each family with the methods whose defaults are roles, so that a fused
# q/k/v split, a missing MLP module or a position offset shows up here, plus one LoRA and one prompt row each.
ARCHITECTURE_ROWS = [
    *[Row(lambda: peftkit.IA3Config(), m, ia3_count, id=f"ia3-{m}")  # fused q/k/v: per head, q|k|v, multi-query
      for m in ("gpt_neox", "phi3", "bloom", "falcon", "opt", "roberta", "t5")],
    *[Row(lambda: HydraConfig(r=2, seq_r=2), m, hydra_count, id=f"hydra-{m}") for m in ("opt", "deberta_v2")],
    Row(lambda: DiffFitConfig(), "phi3", difffit_count, id="difffit-phi3"),
    *[Row(lambda k=k: BottleneckConfig(kind=k, bottleneck=4), m, bottleneck_count, mergeable=False,
          id=f"adapter-{k}-{m}") for k, m in (("houlsby", "gpt_neox"), ("parallel", "gemma2"))],
    *[Row(lambda: LoFiTConfig(heads=[[0, 1], [1, 3]]), m, lofit_count, id=f"lofit-{m}") for m in ("gpt_neox", "roberta")],
    *[Row(lambda: LlamaAdapterConfig(adapter_len=3), m, llama_adapter_count, mergeable=False, id=f"llama-adapter-{m}")
      for m in ("qwen2", "gemma2")],  # grouped-query attention with q/k/v biases; Gemma 2's query scale
    *[Row(lambda: peftkit.LoRAConfig(r=2, alpha=4), m, lora_count, id=f"lora-{m}") for m in ("phi3", "falcon")],
    *[Row(lambda: peftkit.PromptTuningConfig(num_virtual_tokens=3), m, prompt_count, identity_at_init=False,
          mergeable=False, id=f"prompt-tuning-{m}") for m in ("opt", "roberta")],  # learned positions, offsets
    Row(lambda: PrefixTuningConfig(num_virtual_tokens=3), "gpt_neox", prefix_count, identity_at_init=False,
        mergeable=False, id="prefix-tuning-gpt_neox"),
]
ROWS = [
    *[Row(lambda: peftkit.IA3Config(), m, ia3_count, id=f"ia3-{m}")
      for m in ("gpt_neox", "phi3", "qwen2", "gemma2", "opt", "bloom", "falcon", "roberta", "deberta_v2", "t5")],
    *[Row(lambda: HydraConfig(r=2, seq_r=2), m, hydra_count, id=f"hydra-{m}") for m in ("gpt_neox", "opt", "t5")],
    *[Row(lambda: DiffFitConfig(), m, difffit_count, id=f"difffit-{m}") for m in ("phi3", "bloom", "roberta")],
    *[Row(lambda k=k: BottleneckConfig(kind=k, bottleneck=4), m, bottleneck_count, mergeable=False,
          id=f"adapter-{k}-{m}") for k, m in (("houlsby", "gpt_neox"), ("parallel", "gemma2"), ("pfeiffer", "t5"))],
    *[Row(lambda: LoFiTConfig(heads=[[0, 1], [1, 3]]), m, lofit_count, merge_adds_bias=m in ("phi3", "qwen2"),
          id=f"lofit-{m}") for m in ("gpt_neox", "phi3", "roberta")],
    Row(lambda: LlamaAdapterConfig(adapter_len=3), "qwen2", llama_adapter_count, mergeable=False,
        id="llama-adapter-qwen2"),
    Row(lambda: LlamaAdapterConfig(adapter_len=3), "gemma2", llama_adapter_count, mergeable=False,
        id="llama-adapter-gemma2"),
    *[Row(lambda: peftkit.LoRAConfig(r=2, alpha=4), m, lora_count, id=f"lora-{m}")
      for m in ("phi3", "falcon", "deberta_v2", "t5")],
    *[Row(lambda: peftkit.PromptTuningConfig(num_virtual_tokens=3), m, prompt_count, identity_at_init=False,
          mergeable=False, id=f"prompt-tuning-{m}") for m in ("opt", "roberta")],
    Row(lambda: PrefixTuningConfig(num_virtual_tokens=3), "gpt_neox", prefix_count, identity_at_init=False,
        mergeable=False, id="prefix-tuning-gpt_neox"),
]
ROWS = [
    *[Row(lambda: peftkit.LoRAConfig(r=4, alpha=8), m, lora_count) for m in ("mlp", *LLM)],
    Row(lambda: peftkit.LoRAConfig(r=2, targets=["conv1", "conv2"]), "cnn", lora_count),
    Row(lambda: peftkit.LoRAConfig(r=4, targets=["embed_tokens", "q_proj"], rslora=True), "llama", lora_count,
        id="lora-embedding-rslora"),
    Row(lambda: peftkit.LoRAConfig(r=4, init="gaussian", dropout=0.1, layers=[1]), "llama", lora_count,
        id="lora-gaussian-layers"),
    Row(lambda: peftkit.LoRAConfig(r=4, init="pissa", targets=["q_proj", "v_proj"]), "llama", lora_count,
        identity_at_init=True, atol=2e-5, id="lora-pissa"),
    Row(lambda: peftkit.LoRAConfig(r=4, init="olora", targets=["c_attn"]), "gpt2", lora_count, atol=2e-5,
        id="lora-olora"),
    *[Row(lambda: peftkit.DoRAConfig(r=4, alpha=8), m, dora_count) for m in ("mlp", *LLM)],
    Row(lambda: peftkit.IA3Config(targets=["fc1", "fc2"], feedforward=["fc2"]), "mlp", ia3_count),
    *[Row(lambda: peftkit.IA3Config(), m, ia3_count) for m in LLM],
    *[Row(lambda: peftkit.PromptTuningConfig(num_virtual_tokens=3), m, prompt_count, identity_at_init=False,
          mergeable=False) for m in LLM],
    *[Row(lambda: PrefixTuningConfig(num_virtual_tokens=3), m, prefix_count, identity_at_init=False, mergeable=False)
      for m in LLM],
    Row(lambda: PrefixTuningConfig(num_virtual_tokens=2, projection=True, projection_hidden=8), "gpt2", prefix_count,
        identity_at_init=False, mergeable=False, id="prefix-tuning-projection-gpt2"),
    Row(lambda: PrefixTuningConfig(num_virtual_tokens=2, init="random", shift_positions=False), "llama", prefix_count,
        identity_at_init=False, mergeable=False, id="prefix-tuning-random-unshifted-llama"),
    *[Row(lambda: PTuningConfig(num_virtual_tokens=3, encoder_hidden=8), m, p_tuning_count, identity_at_init=False,
          mergeable=False) for m in LLM],
    Row(lambda: PTuningConfig(num_virtual_tokens=2, encoder="lstm", encoder_hidden=4), "llama", p_tuning_count,
        identity_at_init=False, mergeable=False, id="p-tuning-lstm-llama"),
    *[Row(lambda: DePTConfig(num_virtual_tokens=2, r=2, max_length=8), m, dept_count, identity_at_init=False,
          mergeable=False) for m in LLM],
    Row(lambda: DePTConfig(num_virtual_tokens=0, r=2, max_length=4, init="random"), "llama", dept_count,
        mergeable=False, id="dept-no-prompt-short-s-llama"),  # B = 0 and m = 0: the base model; 6 tokens > s = 4
    *[Row(lambda: SVFitConfig(r=4), m, svfit_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: SVFitConfig(energy=0.9), "llama", svfit_count, id="svfit-energy"),
    *[Row(lambda: LoLDUConfig(r=4, alpha=4), m, loldu_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: LoLDUConfig(train_scale=True, init="normal"), "gpt2", loldu_count, id="loldu-fullrank-scale"),
    *[Row(lambda: DSEEConfig(r=4, num_sparse=8), m, dsee_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: DSEEConfig(r=2, num_sparse=5, support="svd", targets=["c_attn"]), "gpt2", dsee_count, id="dsee-svd"),
    *[Row(lambda: PEGOConfig(r=2, num_modules=3, alpha=4.0), m, pego_count) for m in ("mlp", "llama", "gpt2")],
    *[Row(lambda: SSFConfig(init_std=0.0), m, ssf_count) for m in ("mlp", *LLM)],
    Row(lambda: SSFConfig(init_std=0.0, targets=["conv1", "conv2"]), "cnn", ssf_count),
    Row(lambda: SSFConfig(), "bert", ssf_count, identity_at_init=False, id="ssf-paper-init"),
    Row(lambda: SSFConfig(init_std=0.0, targets=["input-embeddings", "all-norms", "q_proj"], bias_free_shift=True),
        "llama", ssf_count, mergeable=False, id="ssf-llama-shift-everywhere"),
    *[Row(lambda: DiffFitConfig(), m, difffit_count) for m in LLM],
    Row(lambda: DiffFitConfig(targets=["fc2"], per_channel=True), "mlp", difffit_count),
    Row(lambda: DiffFitConfig(targets=["conv2"]), "cnn", difffit_count),
    Row(lambda: DiffFitConfig(per_channel=True, layers=[1]), "gpt2", difffit_count, id="difffit-vector-layers"),
    Row(lambda: SSFConfig(init_std=0.0, targets=["all-linear", "all-norms", "patch_embed.proj"]), "vit", ssf_count,
        id="ssf-vit-paper-placement"),
    Row(lambda: DiffFitConfig(), "vit", difffit_count),
    *[Row(lambda: BitFitConfig(), m, bias_count) for m in ("mlp", "bert", "gpt2", "cnn")],
    *[Row(lambda: LNTuningConfig(), m, norm_count) for m in LLM],
    *[Row(lambda: RandLoRAConfig(r=4, alpha=8), m, randlora_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: RandLoRAConfig(r=3, alpha=6, bases="sparse", targets=["q_proj", "down_proj"]), "llama",
        randlora_count, id="randlora-sparse"),
    *[Row(lambda: DiffuseKronAConfig(alpha=2.0), m, kron_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: DiffuseKronAConfig(a1=4, a2=2, targets=["q_proj", "up_proj"]), "llama", kron_count,
        id="diffusekrona-fixed-factors"),
    *[Row(lambda r=r: BoneConfig(r=r), m, bone_count)
      for m, r in (("mlp", 4), ("llama", 8), ("gpt2", 8), ("bert", 8))],  # r divides every adapted shape
    Row(lambda: BoneConfig(r=16, targets=["q_proj", "down_proj"], layers=[0]), "llama", bone_count,
        id="bone-r16-layers"),
    *[Row(lambda: HydraConfig(r=2, seq_r=3, scaling=0.5), m, hydra_count) for m in ("mlp", "vit", *LLM)],
    Row(lambda: HydraConfig(r=2, dropout=0.2, targets="all-linear"), "gpt2", hydra_count, id="hydra-dropout-all"),
    *[Row(lambda k=k: BottleneckConfig(kind=k, bottleneck=4), m, bottleneck_count, mergeable=False,
          id=f"adapter-{k}-{m}") for k in ("houlsby", "pfeiffer", "parallel") for m in LLM
      if (k, m) != ("parallel", "bert")],  # BERT's feed-forward has no single module to run alongside
    Row(lambda: BottleneckConfig(kind="parallel", bottleneck=4, activation="silu", scaling=2.0, layers=[1]), "llama",
        bottleneck_count, mergeable=False, id="adapter-parallel-silu-layers"),
    Row(lambda: LlamaAdapterConfig(adapter_len=3, adapter_layers=1), "llama", llama_adapter_count, mergeable=False),
    *[Row(lambda: SpIELConfig(density=0.1), m, spiel_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: SpIELConfig(density=0.02, targets=["q_proj", "down_proj"], reselection_decay="cosine"), "llama",
        spiel_count, id="spiel-targets-cosine"),
    *[Row(lambda: LoFiTConfig(heads=[[0, 1], [1, 0], [1, 1]]), m, lofit_count, merge_adds_bias=m == "llama")
      for m in ("llama", "gpt2", "bert", "vit")],
    Row(lambda: LoFiTConfig(heads=[[1, 0]]), "llama", lofit_count, merge_adds_bias=True, id="lofit-one-layer-llama"),
    *[Row(lambda: LoFiTConfig(), m, lofit_count, identity_at_init=False, id=f"lofit-stage1-{m}") for m in ("llama", "gpt2")],
    *[Row(lambda: peftkit.FullFineTuneConfig(), m, full_count, can_disable=False, trains_base=True)
      for m in ("mlp", "llama")],
    *[Row(lambda: peftkit.HeadOnlyConfig(), m, head_count) for m in ("mlp", "bert", "cnn", "gpt2")],
    *[Row(lambda: AdaLoRAConfig(init_r=4, target_r=2), m, adalora_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: AdaLoRAConfig(init_r=3, target_r=1, dropout=0.1, targets=["q_proj", "down_proj"]), "llama",
        adalora_count, id="adalora-dropout-targets"),
    *[Row(lambda: IncreLoRAConfig(target_rank=4), m, increlora_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: IncreLoRAConfig(target_rank=2, max_r=6, advance_learning=False, dropout=0.1, targets=["q_proj"]),
        "llama", increlora_count, id="increlora-no-reserve-dropout"),
    *[Row(lambda: TriAdaptLoRAConfig(target_rank=4), m, triadaptlora_count) for m in ("mlp", "llama", "gpt2")],
    Row(lambda: TriAdaptLoRAConfig(target_rank=2, max_r=5, threshold="cosine", dropout=0.1, targets=["v_proj"]),
        "llama", triadaptlora_count, id="triadaptlora-cosine-dropout"),
    Row(lambda: spt_planned("vit", budget=500), "vit", spt_count),
    Row(lambda: spt_planned("mlp", budget=150), "mlp", spt_count),
    Row(lambda: spt_planned("gpt2", budget=400), "gpt2", spt_count),
    Row(lambda: VQTConfig(num_queries=2), "vit", vqt_count, identity_at_init=False, mergeable=False),
    *ARCHITECTURE_ROWS,
]


def _row_id(row: Row) -> str:
    return row.id or f"{row.config().method}-{row.model}"


def setup_row(row: Row, seed: int = 0):
    model = MODELS[row.model](seed)
    inputs = example_inputs(row.model)
    with torch.no_grad():
        base_out = output_of(model, inputs)
    base_state = copy.deepcopy(model.state_dict())
    peftkit.apply(model, row.config())
    return model, inputs, base_out, base_state


def perturb(model, scale: float = 0.1, seed: int = 3) -> None:
    """Move every trainable parameter away from its init so that later checks can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


rows = pytest.mark.parametrize("row", ROWS, ids=_row_id)


def test_every_registered_method_has_a_row():
    covered = {row.config().method for row in ROWS}
    assert set(peftkit.registered_methods()) <= covered, set(peftkit.registered_methods()) - covered


@rows
def test_identity_at_init(row):
    if not row.identity_at_init:
        pytest.skip("not the identity at init by definition")
    model, inputs, base_out, _ = setup_row(row)
    with torch.no_grad():
        out = output_of(model, inputs)
    torch.testing.assert_close(out, base_out, atol=row.atol, rtol=0)


@rows
def test_merge_equals_unmerged_and_unmerge_restores(row):
    model, inputs, _, base_state = setup_row(row)
    perturb(model)
    with torch.no_grad():
        unmerged = output_of(model, inputs)
        if not row.mergeable:
            with pytest.raises(peftkit.MergeError):
                peftkit.merge(model)
            return
        peftkit.merge(model)
        merged = output_of(model, inputs)
        peftkit.unmerge(model)
        again = output_of(model, inputs)
    torch.testing.assert_close(merged, unmerged, atol=row.atol, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=row.atol, rtol=0)
    if row.trains_base:
        return
    peftkit.unload(model)  # unmerged unload puts the original base weights back
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, base_state[k], atol=row.atol, rtol=0)


@rows
def test_merge_then_unload_is_a_plain_model_with_same_outputs(row):
    if not row.mergeable:
        pytest.skip("not mergeable")
    model, inputs, _, base_state = setup_row(row)
    perturb(model)
    with torch.no_grad():
        adapted = output_of(model, inputs)
        plain = peftkit.unload(peftkit.merge(model))
        out = output_of(plain, inputs)
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in plain.modules())
    added = {k for k in plain.state_dict() if k.endswith(".bias")} - set(base_state) if row.merge_adds_bias else set()
    assert set(plain.state_dict()) - added == set(base_state) and (added or not row.merge_adds_bias)
    assert not hasattr(plain, "peftkit_state")
    torch.testing.assert_close(out, adapted, atol=row.atol, rtol=0)


@rows
def test_save_load_round_trip(row, tmp_path):
    model, inputs, _, _ = setup_row(row)
    perturb(model)
    with torch.no_grad():
        expected = output_of(model, inputs)
    peftkit.save(model, tmp_path)
    fresh = peftkit.load(MODELS[row.model](0), tmp_path)
    with torch.no_grad():
        out = output_of(fresh, inputs)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@rows
def test_only_adapter_parameters_train(row):
    model, inputs, _, _ = setup_row(row)
    perturb(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the method made nothing trainable"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    output_of(model, inputs).float().pow(2).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, f"frozen {n} received a gradient"
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)


@rows
def test_trainable_count_matches_formula(row):
    model = MODELS[row.model](0)
    cfg = row.config()
    expected = row.count(model, cfg)
    peftkit.apply(model, cfg)
    assert peftkit.trainable_parameters(model).trainable == expected


@rows
def test_disabled_equals_base(row):
    model, inputs, base_out, _ = setup_row(row)
    perturb(model)
    if not row.can_disable:
        with pytest.raises(peftkit.ConfigError):
            with peftkit.disabled(model):
                pass
        return
    with torch.no_grad(), peftkit.disabled(model):
        out = output_of(model, inputs)
    torch.testing.assert_close(out, base_out, atol=1e-6, rtol=0)
    with torch.no_grad():
        again = output_of(model, inputs)
    assert again.shape != base_out.shape or not torch.allclose(again, base_out), "re-enabling failed"


@rows
def test_bf16_runs(row):
    if not row.bf16:
        pytest.skip("bf16 not supported")
    model, inputs, base_out, _ = setup_row(row)
    perturb(model)
    model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    out = output_of(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()


@rows
def test_bf16_autocast_trains_an_fp32_model(row):
    """The mixed-precision path a GPU user takes (fp32 weights, bf16 autocast), the method's per-step
    loss term included: finite gradients for the fp32 adapter, an output near the fp32 one."""
    if not row.bf16:
        pytest.skip("bf16 not supported")
    model, inputs, _, _ = setup_row(row)
    perturb(model)
    model.eval()  # no dropout: the two outputs must differ by rounding only
    schedule = schedule_for(model, total_steps=100_000)
    with torch.no_grad():
        expected = output_of(model, inputs).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = output_of(model, inputs)
        loss = out.float().pow(2).mean()
        term = schedule.extra_loss(model) if schedule is not None else None
    (loss if term is None else loss + term).backward()
    torch.testing.assert_close(out.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0.05)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert any(g is not None and g.any() for g in grads.values()), "no adapter parameter got a gradient"


@rows
def test_applying_twice_raises_unless_replace(row):
    model, _, _, _ = setup_row(row)
    with pytest.raises(peftkit.ConfigError, match="already has a peftkit adapter"):
        peftkit.apply(model, row.config())
    peftkit.apply(model, row.config(), replace=True)
    assert get_state(model).config.method == row.config().method
