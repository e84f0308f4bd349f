"""Ray Data preparation on a real local Ray: formats, determinism, packing, fingerprint cache."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, DataConfig
from pipeline.data import prepare_data
from pipeline.models import load_tokenizer

from conftest import lincoln_paragraphs
from test_blocks import read_all


@pytest.fixture(scope="module")
def documents():
    return lincoln_paragraphs(60)


def write_corpus(directory, fmt, documents):
    directory.mkdir(parents=True)
    if fmt == "text":
        for index, doc in enumerate(documents):
            (directory / f"{index:03d}.txt").write_text(doc)
    elif fmt == "jsonl":
        half = len(documents) // 2  # two files, to check the order across files too
        for name, part in (("a.jsonl", documents[:half]), ("b.jsonl", documents[half:])):
            (directory / name).write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(part)))
    elif fmt == "parquet":
        pq.write_table(pa.table({"content": documents}), directory / "docs.parquet")
    elif fmt == "hf":
        import datasets

        datasets.Dataset.from_dict({"content": documents}).save_to_disk(str(directory / "ds"))
    return directory


def data_config(path, tmp, fmt="text", **extra):
    return DataConfig(path=str(path), format=fmt, text_field="content", seq_len=32, cache_dir=str(tmp / "cache"),
                      split={"rule": "hash", "eval_fraction": 0.2}, **extra)


def test_all_four_formats_give_the_same_blocks(ray_session, tmp_path, tiny_model, documents):
    results = {}
    for fmt in ("text", "jsonl", "parquet", "hf"):
        corpus = write_corpus(tmp_path / fmt, fmt, documents)
        prepared = prepare_data(data_config(corpus, tmp_path / f"c-{fmt}", fmt), tiny_model)
        results[fmt] = {split: read_all(prepared.reader(split)) for split in ("train", "eval")}
        assert prepared.stats["train"]["documents"] + prepared.stats["eval"]["documents"] == len(documents)
    reference = results["text"]
    assert len(reference["train"][1]) > 10 and len(reference["eval"][1]) > 0
    for fmt, blocks in results.items():
        for split in ("train", "eval"):
            np.testing.assert_array_equal(blocks[split][1], reference[split][1], err_msg=f"{fmt}/{split}")


def test_packed_stream_is_the_tokenized_documents_with_eos(ray_session, tmp_path, tiny_model, documents):
    corpus = write_corpus(tmp_path / "text", "text", documents)
    cfg = DataConfig(
        path=str(corpus), seq_len=32, cache_dir=str(tmp_path / "cache"), split={"rule": "hash", "eval_fraction": 0.0})
    prepared = prepare_data(cfg, tiny_model)
    tokenizer = load_tokenizer(tiny_model)
    expected = np.concatenate([tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                               for d in documents])
    sample_ids, blocks = read_all(prepared.reader("train"))
    np.testing.assert_array_equal(blocks.reshape(-1), expected[: blocks.size])
    np.testing.assert_array_equal(sample_ids, np.arange(len(blocks)))
    assert prepared.stats["train"]["dropped_tail_tokens"] == len(expected) - blocks.size < 32
    assert prepared.stats["eval"]["blocks"] == 0
    summary = prepared.summary()
    assert f"{len(documents)} documents" in summary and f"{len(expected):,} tokens" in summary and "dropped tail" in summary


def test_same_output_with_one_or_two_tokenizer_actors(ray_session, tmp_path, tiny_model, documents):
    corpus = write_corpus(tmp_path / "text", "text", documents)
    one = prepare_data(data_config(corpus, tmp_path / "one", tokenize_actors=1, tokenize_batch_size=3), tiny_model)
    two = prepare_data(data_config(corpus, tmp_path / "two", tokenize_actors=2, tokenize_batch_size=3), tiny_model)
    assert one.fingerprint == two.fingerprint  # parallelism is not part of what the blocks are
    for split in ("train", "eval"):
        ids_one, blocks_one = read_all(one.reader(split))
        ids_two, blocks_two = read_all(two.reader(split))
        np.testing.assert_array_equal(blocks_one, blocks_two)
        np.testing.assert_array_equal(ids_one, ids_two)
        assert len(set(ids_one.tolist())) == len(ids_one)


def test_fingerprint_cache_hits_and_misses(ray_session, tmp_path, tiny_model, documents):
    corpus = write_corpus(tmp_path / "text", "text", documents)
    cfg = data_config(corpus, tmp_path)
    first = prepare_data(cfg, tiny_model)
    again = prepare_data(cfg, tiny_model)
    assert not first.cache_hit and again.cache_hit and again.root == first.root

    longer = prepare_data(cfg.model_copy(update={"seq_len": 64}), tiny_model)
    assert not longer.cache_hit and longer.fingerprint != first.fingerprint

    other_split = prepare_data(cfg.model_copy(update={"split": cfg.split.model_copy(update={"eval_fraction": 0.5})}),
                               tiny_model)
    assert not other_split.cache_hit and other_split.fingerprint != first.fingerprint

    edited = corpus / "000.txt"
    edited.write_text(edited.read_text() + " An added sentence.")
    os.utime(edited, ns=(0, edited.stat().st_mtime_ns + 10**9))
    after_edit = prepare_data(cfg, tiny_model)
    assert not after_edit.cache_hit and after_edit.fingerprint != first.fingerprint


def test_split_by_number_in_file_name(ray_session, tmp_path, tiny_model, documents):
    corpus = tmp_path / "speeches"
    corpus.mkdir()
    for year, doc in zip(range(1990, 2010), documents):
        (corpus / f"{year}-Someone-1.txt").write_text(doc)
    cfg = DataConfig(path=str(corpus / "*.txt"), seq_len=16, cache_dir=str(tmp_path / "cache"),
                     split={"rule": "path_number", "path_pattern": r"^(\d{4})-", "eval_from": 2000})
    prepared = prepare_data(cfg, tiny_model)
    assert prepared.stats["train"]["documents"] == 10 and prepared.stats["eval"]["documents"] == 10


def test_missing_corpus_names_the_field(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="data.path: no files match"):
        prepare_data(DataConfig(path=str(tmp_path / "nothing-here" / "*.txt")), tiny_model)


def test_same_blocks_whatever_the_chunking_and_the_actors(ray_session, tmp_path, tiny_model, documents):
    """sample_ids come from the source: cutting the JSONL files into 1 KiB pieces (lines cross piece
    borders) and changing the actor count gives the very same blocks."""
    corpus = write_corpus(tmp_path / "jsonl", "jsonl", documents)
    assert all(p.stat().st_size > 4 * 1024 for p in corpus.iterdir())  # every file is cut into pieces
    whole = prepare_data(data_config(corpus, tmp_path / "whole", "jsonl", tokenize_actors=1), tiny_model)
    pieces = prepare_data(data_config(corpus, tmp_path / "pieces", "jsonl", chunk_bytes=1024, tokenize_actors=2),
                          tiny_model)
    assert whole.fingerprint == pieces.fingerprint
    for split in ("train", "eval"):
        ids_whole, blocks_whole = read_all(whole.reader(split))
        ids_pieces, blocks_pieces = read_all(pieces.reader(split))
        np.testing.assert_array_equal(blocks_whole, blocks_pieces)
        np.testing.assert_array_equal(ids_whole, np.arange(len(ids_whole)))
        np.testing.assert_array_equal(ids_pieces, ids_whole)
    assert whole.stats == pieces.stats


def test_a_damaged_token_file_is_named_when_the_cache_is_opened(ray_session, tmp_path, tiny_model, documents):
    from pipeline.data import CorruptCache

    corpus = write_corpus(tmp_path / "text", "text", documents)
    cfg = data_config(corpus, tmp_path)
    shard = prepare_data(cfg, tiny_model).token_files["train"][0].location
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF  # bit rot: same size
    open(shard, "wb").write(bytes(data))
    with pytest.raises(CorruptCache, match=rf"token file {shard} does not match its SHA-256 .*; delete .* to rebuild it"):
        prepare_data(cfg, tiny_model)
    open(shard, "wb").write(bytes(data[:100]))
    with pytest.raises(CorruptCache, match=rf"token file {shard} has 100 bytes, meta.json says {len(data)}"):
        prepare_data(cfg, tiny_model)
    os.remove(shard)
    with pytest.raises(CorruptCache, match=rf"token file {shard} is missing"):
        prepare_data(cfg, tiny_model)
