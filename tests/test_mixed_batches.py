"""Mixed-adapter batches over the whole contract matrix: every row, two adapters of its method on one model,
a batch whose samples name "a", "b" or the base; each sample's output must equal that sample run alone with
its adapter active. A method that cannot act per sample must say so (ConfigError naming it), never run."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.adapters import get_state

from test_contract import ROWS, _row_id, perturb
from tiny_models import MODELS, example_inputs, output_of

NAMES = ["a", "b", peftkit.BASE, "b", "a"]


def _sample(inputs: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in inputs.items()}


def inputs_len(inputs: dict) -> int:
    return next(v for v in inputs.values() if v.dim() >= 2).shape[1]


def _two_adapters(row):
    model = MODELS[row.model](0).eval()
    peftkit.apply(model, row.config(), name="a")
    perturb(model, seed=3)
    second = row.config()
    if any(la.rewrites_base for la in get_state(model, "a").layers.values()):  # PiSSA cannot stack on itself
        second = peftkit.LoRAConfig(r=2, targets=second.targets)
    peftkit.apply(model, second, name="b")  # now the only active and trainable one
    perturb(model, seed=5)
    return model


@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_mixed_batch_equals_each_sample_alone(row):
    try:
        model = _two_adapters(row)
    except peftkit.ConfigError as err:  # e.g. both would train the same base parameters in place
        assert "cannot share" in str(err)
        return
    inputs = example_inputs(row.model, batch=len(NAMES))
    in_place = any(get_state(model, n).selected for n in ("a", "b"))
    layers = [la for n in ("a", "b") for la in get_state(model, n).layers.values()]
    if in_place or any(la.mixed_batch_problem(model) for la in layers):
        with pytest.raises(peftkit.ConfigError, match="mixed-adapter batches"):
            with torch.no_grad():
                output_of(model, {**inputs, "adapter_names": NAMES})
        return
    with torch.no_grad():
        mixed = output_of(model, {**inputs, "adapter_names": NAMES})
        for i, name in enumerate(NAMES):
            if name == peftkit.BASE:
                with peftkit.disabled(model):
                    alone = output_of(model, _sample(inputs, i))
            else:
                peftkit.set_active(model, name)
                alone = output_of(model, _sample(inputs, i))
            ours = mixed[i : i + 1]
            if ours.dim() == 3 and ours.shape[1] != alone.shape[1]:  # prompts add columns: compare the real tokens'
                ours, alone = ours[:, -inputs_len(inputs):], alone[:, -inputs_len(inputs):]
            torch.testing.assert_close(ours, alone, atol=2e-5, rtol=1e-4, msg=f"sample {i} ({name})")
        peftkit.set_active(model, "b")
        other = output_of(model, _sample(inputs, 0))[0]
        tail = min(other.shape[0], mixed.shape[1]) if other.dim() == 2 else None
        assert not torch.allclose(mixed[0][-tail:] if tail else mixed[0], other[-tail:] if tail else other), \
            "the two adapters must differ"


@pytest.mark.parametrize("row", [r for r in ROWS if r.identity_at_init], ids=_row_id)
def test_stacked_on_another_adapter_at_init_keeps_its_output(row):
    """A method applied on top of a trained LoRA is the identity at init: a fused kernel that read the base
    weight itself would skip the LoRA under it, and this would fail."""
    model = MODELS[row.model](0).eval()
    inner = peftkit.LoRAConfig(r=2, targets=row.config().targets)
    try:
        peftkit.apply(model, inner, name="inner")
    except peftkit.ConfigError:  # targets LoRA does not take (norms, block containers ...): nothing to stack on
        pytest.skip("LoRA cannot target this row's modules")
    perturb(model, seed=3)
    inputs = example_inputs(row.model)
    with torch.no_grad():
        expected = output_of(model, inputs)
    try:
        peftkit.apply(model, row.config(), name="outer")
    except peftkit.ConfigError as err:
        assert "cannot share" in str(err)
        return
    peftkit.set_active(model, ["inner", "outer"])
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, inputs), expected, atol=row.atol, rtol=1e-5)


GENERATE_CASES = [
    ("llama", lambda: peftkit.LoRAConfig(r=4), {"num_beams": 2}),
    ("gpt2", lambda: peftkit.LoRAConfig(r=4), {"num_beams": 2, "num_return_sequences": 2}),
    *[(m, lambda: peftkit.PromptTuningConfig(num_virtual_tokens=3), {}) for m in ("llama", "gpt2")],
    *[(m, lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=3), {}) for m in ("llama", "gpt2")],
    ("llama", lambda: peftkit.PTuningConfig(num_virtual_tokens=2, encoder_hidden=8), {}),
    ("gpt2", lambda: peftkit.DePTConfig(num_virtual_tokens=2, r=2, max_length=8), {}),
    ("llama", lambda: peftkit.LlamaAdapterConfig(adapter_len=3, adapter_layers=1), {}),
]


@pytest.mark.parametrize("kind,config,options", GENERATE_CASES,
                         ids=[f"{c().method}-{m}-{'-'.join(o) or 'greedy'}" for m, c, o in GENERATE_CASES])
def test_mixed_batch_generate_equals_each_sample_generated_alone(kind, config, options):
    """Later decoding steps too: the cache holds every routed prompt/prefix, masked per sample; beam search
    and num_return_sequences repeat each sample's entry."""
    model = MODELS[kind](0).eval()
    peftkit.apply(model, config(), name="a")
    perturb(model, seed=3)
    peftkit.apply(model, config(), name="b")
    perturb(model, seed=5)
    assert_generate_matches(model, example_inputs(kind, batch=3)["input_ids"], ["a", peftkit.BASE, "b"], options)


def assert_generate_matches(model, ids, names: list[str], options: dict) -> None:
    """Generating a batch with one adapter name per prompt equals generating each prompt alone with its adapter."""
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, **options}
    per = options.get("num_return_sequences", 1)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
        for i, name in enumerate(names):
            row = ids[i : i + 1]
            if name == peftkit.BASE:
                with peftkit.disabled(model):
                    alone = model.generate(input_ids=row, attention_mask=torch.ones_like(row), **kw)
            else:
                peftkit.set_active(model, name)
                alone = model.generate(input_ids=row, attention_mask=torch.ones_like(row), **kw)
            assert torch.equal(mixed[i * per : (i + 1) * per], alone), name
