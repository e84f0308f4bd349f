"""A corpus holding every kind of bad record, on real files through real Ray Data, under both
`data.on_bad_record` policies; a corpus with nothing usable; a parquet file without the text column."""

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, DataConfig
from pipeline.data import BadRecordError, NoUsableDocuments, prepare_data
from pipeline.locations import location_overrides

from conftest import TINY_YAML, lincoln_paragraphs

TEN_MB = 10_000_000
UNREADABLE_COUNT = 2 if os.geteuid() == 0 else 3  # a dangling link, a FIFO; root reads a chmod-000 file anyway


@pytest.fixture(scope="module")
def paragraphs():
    return lincoln_paragraphs(24)


def good_lines(paragraphs):
    return [json.dumps({"text": p}).encode() for p in paragraphs]


@pytest.fixture
def messy_corpus(tmp_path, paragraphs):
    """a.jsonl: good lines with one of each bad kind between them; b.jsonl: good lines only;
    c.jsonl: a dangling link; d.jsonl: no read permission (unreadable except to root); e.jsonl: a FIFO
    (opening it to check it would block forever)."""
    corpus = tmp_path / "messy"
    corpus.mkdir()
    good = good_lines(paragraphs)
    bad = [b'{"text": "unterminated', b'{"text": "caf\xe9 au lait"}', json.dumps({"text": "   "}).encode(),
           json.dumps({"body": "no text field"}).encode(), json.dumps({"text": "x" * TEN_MB}).encode(), b"[1, 2]"]
    a_lines = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], good[4], bad[4], good[5], bad[5]]
    a_lines += good[6:12]
    (corpus / "a.jsonl").write_bytes(b"\n".join(a_lines) + b"\n")
    (corpus / "b.jsonl").write_bytes(b"\n".join(good[12:]) + b"\n")
    (corpus / "c.jsonl").symlink_to(tmp_path / "moved-away.jsonl")
    locked = corpus / "d.jsonl"
    locked.write_bytes(good[0] + b"\n")
    locked.chmod(0)
    os.mkfifo(corpus / "e.jsonl")
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "a.jsonl").write_bytes(b"\n".join(good[:12]) + b"\n")
    (clean / "b.jsonl").write_bytes(b"\n".join(good[12:]) + b"\n")
    if os.geteuid() == 0:  # root reads the locked file: the clean corpus has its document too
        (clean / "d.jsonl").write_bytes(good[0] + b"\n")
    return corpus, clean


def data_config(path, tmp, **extra):
    return DataConfig(path=str(path), format="jsonl", seq_len=32, cache_dir=str(tmp / "cache"),
                      split={"rule": "hash", "eval_fraction": 0.2}, **extra)


def documents(prepared):
    return sum(prepared.stats[split]["documents"] for split in ("train", "eval"))


def tokens(prepared):
    return sum(prepared.stats[split]["tokens"] for split in ("train", "eval"))


def test_skip_counts_every_bad_kind_and_keeps_every_good_document(ray_session, tmp_path, tiny_model, messy_corpus):
    corpus, clean = messy_corpus
    prepared = prepare_data(data_config(corpus, tmp_path), tiny_model)
    assert prepared.bad_records == {"invalid_json": 2, "not_utf8": 1, "empty": 1, "missing_field": 1,
                                    "too_large": 1, "unreadable_file": UNREADABLE_COUNT}
    assert prepared.bad_examples["invalid_json"].startswith("a.jsonl:2: not valid JSON (")
    assert prepared.bad_examples["not_utf8"] == "a.jsonl:4: not valid UTF-8 (byte 13)"
    assert prepared.bad_examples["too_large"] == f"a.jsonl:10: larger than data.max_document_bytes ({TEN_MB + 12:,} bytes)"
    assert prepared.bad_examples["unreadable_file"] == (f"{corpus / 'c.jsonl'}: file cannot be read "
                                                        f"(dangling link to {tmp_path / 'moved-away.jsonl'})")
    summary = prepared.summary()
    assert f"skipped {6 + UNREADABLE_COUNT} bad records: empty 1, invalid_json 2, missing_field 1" in summary
    # Nothing good was lost: the same documents and tokens as a corpus holding only the good lines.
    reference = prepare_data(data_config(clean, tmp_path / "clean-cache"), tiny_model)
    assert (documents(prepared), tokens(prepared)) == (documents(reference), tokens(reference))
    assert reference.bad_records == {}
    again = prepare_data(data_config(corpus, tmp_path), tiny_model)  # a cache hit still knows the counts
    assert again.cache_hit and again.bad_records == prepared.bad_records


@pytest.mark.parametrize("chunk_bytes", [32 << 20, 1024])  # whole files, and files cut into 1 KiB pieces
def test_fail_names_the_first_bad_record(ray_session, tmp_path, tiny_model, messy_corpus, chunk_bytes):
    corpus, _ = messy_corpus
    with pytest.raises(BadRecordError, match=rf"data: {corpus / 'c.jsonl'}: file cannot be read \("):
        prepare_data(data_config(corpus, tmp_path, on_bad_record="fail"), tiny_model)
    (corpus / "c.jsonl").unlink()
    (corpus / "d.jsonl").unlink()
    (corpus / "e.jsonl").unlink()
    (corpus / "a.jsonl").write_bytes(b"".join(good_lines(lincoln_paragraphs(24)[12:20])) .replace(b"}{", b"}\n{")
                                     + b"\n" + (corpus / "a.jsonl").read_bytes())  # 8 good lines first, ~4 KB
    with pytest.raises(BadRecordError) as error:
        prepare_data(data_config(corpus, tmp_path, on_bad_record="fail", chunk_bytes=chunk_bytes), tiny_model)
    assert str(error.value).startswith("data: a.jsonl:10: not valid JSON (Unterminated string")
    assert str(error.value).endswith("; set data.on_bad_record=skip to skip and count such records")
    assert not list((tmp_path / "cache").glob("[!.]*")), "a failed preparation must not leave a cache entry"


def test_no_usable_document_is_a_clear_error_before_training(ray_session, tmp_path, tiny_model):
    corpus = tmp_path / "hopeless"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(b'{"text": ""}\nnot json\n{"title": "x"}\n')
    with pytest.raises(NoUsableDocuments) as error:
        prepare_data(data_config(corpus, tmp_path), tiny_model)
    message = str(error.value)
    assert message.startswith(f"data.path: no usable document in the 1 readable files of '{corpus}'")
    assert "empty 1, invalid_json 1, missing_field 1" in message
    assert not list((tmp_path / "cache").glob("[!.]*"))
    (corpus / "a.jsonl").unlink()
    (corpus / "gone.jsonl").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NoUsableDocuments, match=r"no readable file in .* unreadable_file 1"):
        prepare_data(data_config(corpus, tmp_path), tiny_model)


def test_parquet_without_the_text_column_names_the_field_before_ray_reads(tmp_path, tiny_model):
    corpus = tmp_path / "pq"
    corpus.mkdir()
    pq.write_table(pa.table({"body": ["some text"]}), corpus / "docs.parquet")
    cfg = DataConfig(path=str(corpus), format="parquet", text_field="content", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"data.text_field: 'content' is not a column of .*docs.parquet \(columns: body\)"):
        prepare_data(cfg, tiny_model)
    pq.write_table(pa.table({"content": [1, 2]}), corpus / "docs.parquet")  # the column, but numbers
    with pytest.raises(ConfigError, match=r"data.text_field: column 'content' of .*docs.parquet holds int64, not text"):
        prepare_data(cfg, tiny_model)


def test_split_rule_that_cannot_place_a_file_is_named_before_ray_reads(tmp_path, tiny_model):
    corpus = tmp_path / "speeches"
    corpus.mkdir()
    (corpus / "1999-a.txt").write_text("Some words.")
    (corpus / "notes.txt").write_text("More words.")
    cfg = DataConfig(path=str(corpus), cache_dir=str(tmp_path / "cache"), split={"rule": "path_number", "eval_from": 2000})
    with pytest.raises(ConfigError, match=re.escape(r"data.split.path_pattern: '^(\d+)' does not match a number in 'notes.txt'")):
        prepare_data(cfg, tiny_model)


@pytest.mark.parametrize("policy, message", [
    ("fail", "pipeline: data: {corpus}/c.jsonl: file cannot be read (dangling link to {tmp}/moved-away.jsonl); "
             "set data.on_bad_record=skip to skip and count such records"),
    ("skip", "pipeline: data.path: no readable file in '{corpus}' (skipped 1 bad record: unreadable_file 1 "
             "(first of each: {corpus}/c.jsonl: file cannot be read (dangling link to {tmp}/moved-away.jsonl)))"),
])
def test_cli_prints_one_line_and_exits_2(ray_session, tmp_path, tiny_model, capsys, monkeypatch, policy, message):
    """`pipeline prepare` as a user runs it (in-process, on the module's Ray): a corpus whose only
    file is a dangling link stops before Ray reads, under either policy."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "c.jsonl").symlink_to(tmp_path / "moved-away.jsonl")
    monkeypatch.chdir(tmp_path)
    code = main(["prepare", "--config", str(TINY_YAML), *location_overrides(tmp_path), "model.source=hf_dir",
                 f"model.path={tiny_model}", f"data.path={corpus}", "data.format=jsonl", "data.split.rule=hash",
                 f"data.on_bad_record={policy}"])
    assert (code, capsys.readouterr().err.strip().splitlines()) == (2, [message.format(corpus=corpus, tmp=tmp_path)])
