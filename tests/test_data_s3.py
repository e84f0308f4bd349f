"""Preparation with the corpus and the cache in a bucket of a real S3-compatible server (moto on
127.0.0.1): the same blocks as on local disk, nothing left behind, damage named when opened."""

import json

import numpy as np
import pytest

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.data import CorruptCache, prepare_data

from conftest import lincoln_paragraphs
from test_blocks import read_all
from test_data import data_config, write_corpus


def test_bucket_corpus_and_cache_give_the_local_blocks(ray_with_s3, tmp_path, tiny_model):
    s3 = ray_with_s3
    corpus = write_corpus(tmp_path / "jsonl", "jsonl", lincoln_paragraphs(60))
    bucket = s3.bucket()
    storage.upload_dir(corpus, f"s3://{bucket}/corpus")
    local = prepare_data(data_config(corpus, tmp_path / "local", "jsonl"), tiny_model)
    cfg = DataConfig(path=f"s3://{bucket}/corpus", format="jsonl", text_field="content", seq_len=32,
                     cache_dir=f"s3://{bucket}/cache", split={"rule": "hash", "eval_fraction": 0.2}, chunk_bytes=2048)
    remote = prepare_data(cfg, tiny_model)
    assert not remote.cache_hit and remote.root.startswith(f"s3://{bucket}/cache/")
    assert remote.stats == local.stats
    for split in ("train", "eval"):
        assert all(f.location.startswith("s3://") for f in remote.token_files[split])
        reader = remote.reader(split)  # range reads from the bucket
        np.testing.assert_array_equal(read_all(reader)[1], read_all(local.reader(split))[1])
        picked = np.arange(reader.blocks)[::-3]
        np.testing.assert_array_equal(reader.read(picked), read_all(local.reader(split))[1][picked])
    stored = sorted(f.relative for f in storage.list_files(remote.root))
    assert stored == sorted(["meta.json", *(f.location.removeprefix(remote.root + "/")
                                             for split in ("train", "eval") for f in remote.token_files[split])])

    puts_before = sum(method == "PUT" for method, _ in s3.requests())
    again = prepare_data(cfg, tiny_model)
    assert again.cache_hit and again.stats == remote.stats
    assert sum(method == "PUT" for method, _ in s3.requests()) == puts_before  # a hit writes nothing

    shard = remote.token_files["train"][0].location
    key = shard.removeprefix(f"s3://{bucket}/")
    body = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.client().put_object(Bucket=bucket, Key=key, Body=body[:-10])
    with pytest.raises(CorruptCache, match=rf"token file {shard} has {len(body) - 10} bytes, meta.json says {len(body)}"):
        prepare_data(cfg, tiny_model)


def test_a_failed_build_leaves_nothing_in_the_bucket(ray_with_s3, tmp_path, tiny_model):
    from pipeline.data import BadRecordError

    s3 = ray_with_s3
    bucket = s3.bucket()
    good = "".join(json.dumps({"content": p}) + "\n" for p in lincoln_paragraphs(20))
    s3.client().put_object(Bucket=bucket, Key="corpus/a.jsonl", Body=(good + "{broken\n" + good).encode())
    cfg = DataConfig(path=f"s3://{bucket}/corpus", format="jsonl", text_field="content", seq_len=32,
                     cache_dir=f"s3://{bucket}/cache", on_bad_record="fail", chunk_bytes=1024)
    with pytest.raises(BadRecordError, match=r"data: a.jsonl:21: not valid JSON"):
        prepare_data(cfg, tiny_model)
    assert storage.list_files(f"s3://{bucket}/cache") == []
