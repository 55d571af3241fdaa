"""Interop with Hugging Face peft for prefix tuning (PREFIX_TUNING) and P-tuning (P_TUNING), both directions.

* peftkit -> peft: `peftkit.save(model, d, format="peft")`, then `peft.PeftModel.from_pretrained(base, d)`
  gives the peftkit model's logits and loss; the directory also reads back into peftkit;
* peft -> peftkit: `peft_model.save_pretrained(d)`, then `peftkit.load(base, d)` gives peft's outputs.

peft saves computed prompts and prefixes only (not the P-tuning encoder, not the prefix MLP), so a
peft-written P-tuning file loads as prompt tuning and a prefix_projection one as plain prefixes.
DePT has no peft form (peft 0.21.2 has no DePT). BERT prefix tuning has no round trip: peft cannot run
it with transformers 5 (the last test shows why).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_prefix_dept import N, _greedy_by_full_recompute, _llama, _randomize, _trainable

import peftkit
from peftkit.methods.p_tuning import PTuningConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig

from tiny_models import MODELS, example_inputs, tiny_bert

peft = pytest.importorskip("peft")

INTEROP = {  # kind, peftkit config, peft config, the config class a peft-written file loads as
    "prefix-llama": ("llama", lambda: PrefixTuningConfig(num_virtual_tokens=N),
                     lambda: peft.PrefixTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"), PrefixTuningConfig),
    "prefix-gqa": ("gqa", lambda: PrefixTuningConfig(num_virtual_tokens=N),
                   lambda: peft.PrefixTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"), PrefixTuningConfig),
    "prefix-mlp-gpt2": ("gpt2", lambda: PrefixTuningConfig(num_virtual_tokens=N, projection=True, projection_hidden=16),
                        lambda: peft.PrefixTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM",
                                                        prefix_projection=True, encoder_hidden_size=16),
                        PrefixTuningConfig),  # peft saves computed prefixes only: they load as plain prefixes
    "p-tuning-mlp-llama": ("llama", lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden=16),
                           lambda: peft.PromptEncoderConfig(num_virtual_tokens=N, task_type="CAUSAL_LM",
                                                            encoder_hidden_size=16), peftkit.PromptTuningConfig),
    "p-tuning-lstm-bert": ("bert", lambda: PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden=8),
                           lambda: peft.PromptEncoderConfig(num_virtual_tokens=N, task_type="SEQ_CLS",
                                                            encoder_hidden_size=8,
                                                            encoder_reparameterization_type="LSTM"),
                           peftkit.PromptTuningConfig),  # peft saves the encoder's output only
}


def _base(kind):
    return _llama(kv_heads=1) if kind == "gqa" else MODELS[kind]()


def _compare(ours, theirs, kind):
    inputs = example_inputs("llama" if kind == "gqa" else kind)
    if kind != "bert":
        inputs["labels"] = inputs["input_ids"]
    with torch.no_grad():
        a, b = ours(**inputs), theirs(**inputs)
    assert a.logits.shape == b.logits.shape and (a.logits - b.logits).abs().max() < 1e-5
    if kind != "bert":
        assert abs(a.loss.item() - b.loss.item()) < 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about missing heads, transformers about token ids
        yield


@pytest.mark.parametrize("kind, ours, _, __", INTEROP.values(), ids=INTEROP.keys())
def test_peftkit_to_peft(kind, ours, _, __, tmp_path):
    model = peftkit.apply(_base(kind), ours())
    _randomize(_trainable(model), scale=0.3)
    peftkit.save(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(_base(kind), tmp_path).eval()
    _compare(model, theirs, kind)
    _compare(model, peftkit.load(_base(kind), tmp_path), kind)  # and the exported directory reads back
    if kind != "bert":
        # our cached greedy decoding equals decoding by recomputing peft's forward; peft 0.21.2's own generate
        # is no reference here: under transformers 5.24 it disagrees with its forward for prefix and P-tuning
        ids = example_inputs("llama", batch=1)["input_ids"]
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
        assert torch.equal(generated, _greedy_by_full_recompute(theirs, ids, 4))


@pytest.mark.parametrize("kind, _, theirs, loads_as", INTEROP.values(), ids=INTEROP.keys())
def test_peft_to_peftkit(kind, _, theirs, loads_as, tmp_path):
    written = peft.get_peft_model(_base(kind), theirs()).eval()
    _randomize([p for p in written.parameters() if p.requires_grad], scale=0.3)
    written.save_pretrained(tmp_path)
    ours = peftkit.load(_base(kind), tmp_path)
    assert type(ours.peftkit_state.config) is loads_as
    _compare(ours, written, kind)


def test_peft_cannot_run_prefix_tuning_on_bert():
    """Why there is no BERT prefix round trip: peft 0.21.2 looks for a `past_key_values` argument in the
    classifier's encoder, which transformers 5 renamed to `cache` (peftkit's own BERT prefix is tested above)."""
    theirs = peft.get_peft_model(tiny_bert(), peft.PrefixTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="does not support past key values"):
        theirs(**example_inputs("bert"))
