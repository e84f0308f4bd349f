"""Packing without Ray: the block plan and the shard writer keep every token in order."""

import itertools

import numpy as np
import pyarrow.parquet as pq

from pipeline.data.pack import plan_split, write_shard


def read_blocks(shards):
    tables = [pq.read_table(p) for p in shards]
    sample_ids = np.concatenate([t.column("sample_id").to_numpy() for t in tables])
    blocks = np.concatenate([np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)) for t in tables])
    return sample_ids, blocks


def pack(tmp_path, streams, seq_len, blocks_per_shard):
    """Token files for `streams` (one per chunk), then the plan and every shard written."""
    token_files = []
    for index, stream in enumerate(streams):
        path = tmp_path / f"chunk-{index}.bin"
        path.write_bytes(np.asarray(stream, dtype="<i4").tobytes())
        token_files.append((str(path), len(stream)))
    layout = plan_split("train", token_files, seq_len, blocks_per_shard, lambda i: str(tmp_path / f"part-{i:05d}.parquet"))
    entries = [write_shard(plan, seq_len) for plan in layout.shards]
    return layout, entries


def test_packing_keeps_every_token_in_order_with_eos_between_documents(tmp_path):
    eos = 0
    rng = np.random.default_rng(0)
    documents = [np.append(rng.integers(1, 100, size=n), eos).astype(np.int32) for n in rng.integers(1, 40, size=50)]
    chunks = [np.concatenate(documents[i:i + 7]) for i in range(0, 50, 7)]  # blocks cross chunk borders
    layout, entries = pack(tmp_path, chunks, seq_len=16, blocks_per_shard=7)  # and shard borders

    stream = np.concatenate(documents)
    sample_ids, blocks = read_blocks([e["location"] for e in entries])
    assert layout.tokens == len(stream)
    assert layout.blocks == len(stream) // 16 == len(blocks) == sum(e["rows"] for e in entries)
    assert layout.dropped_tail_tokens == len(stream) % 16
    assert len(entries) > 1
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: len(blocks) * 16])
    np.testing.assert_array_equal(sample_ids, np.arange(len(blocks)))
    # EOS sits exactly at each document's end, and nowhere else.
    ends = np.cumsum([len(d) for d in documents]) - 1
    packed = blocks.reshape(-1)
    np.testing.assert_array_equal(np.flatnonzero(packed == eos), ends[ends < len(packed)])


def test_the_same_blocks_whatever_the_chunking(tmp_path):
    stream = np.arange(1, 500, dtype=np.int32)
    (tmp_path / "one").mkdir()
    one, one_entries = pack(tmp_path / "one", [stream], seq_len=8, blocks_per_shard=5)
    (tmp_path / "many").mkdir()
    cuts = [0, 3, 90, 91, 250, 499]
    many, many_entries = pack(tmp_path / "many", [stream[a:b] for a, b in itertools.pairwise(cuts)], seq_len=8,
                              blocks_per_shard=3)
    np.testing.assert_array_equal(read_blocks([e["location"] for e in one_entries])[1],
                                  read_blocks([e["location"] for e in many_entries])[1])
    assert one.blocks == many.blocks == 62 and one.dropped_tail_tokens == 3


def test_document_longer_than_many_blocks(tmp_path):
    layout, entries = pack(tmp_path, [np.arange(1, 100, dtype=np.int32)], seq_len=8, blocks_per_shard=2)
    _sample_ids, blocks = read_blocks([e["location"] for e in entries])
    assert layout.blocks == 12 and layout.dropped_tail_tokens == 3 and len(entries) == 6
    np.testing.assert_array_equal(blocks.reshape(-1), np.arange(1, 97))
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in entries)
