import numpy as np
import pyarrow.parquet as pq

from pipeline.data.pack import BlockPacker


def read_blocks(directory):
    tables = [pq.read_table(p) for p in sorted(directory.glob("*.parquet"))]
    sample_ids = np.concatenate([t.column("sample_id").to_numpy() for t in tables])
    blocks = np.concatenate([np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)) for t in tables])
    return sample_ids, blocks


def test_packing_keeps_every_token_in_order_with_eos_between_documents(tmp_path):
    eos = 0
    rng = np.random.default_rng(0)
    documents = [np.append(rng.integers(1, 100, size=n), eos).astype(np.int32) for n in rng.integers(1, 40, size=50)]
    packer = BlockPacker(tmp_path, seq_len=16, blocks_per_file=7)  # small files: blocks cross file borders
    for doc in documents:
        packer.add_document(doc)
    stats = packer.close()

    stream = np.concatenate(documents)
    sample_ids, blocks = read_blocks(tmp_path)
    assert stats["tokens"] == len(stream) and stats["documents"] == 50
    assert stats["blocks"] == len(stream) // 16 == len(blocks)
    assert stats["dropped_tail_tokens"] == len(stream) % 16
    assert stats["files"] > 1
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: len(blocks) * 16])
    np.testing.assert_array_equal(sample_ids, np.arange(len(blocks)))
    # EOS sits exactly at each document's end, and nowhere else.
    ends = np.cumsum([len(d) for d in documents]) - 1
    packed = blocks.reshape(-1)
    np.testing.assert_array_equal(np.flatnonzero(packed == eos), ends[ends < len(packed)])


def test_document_longer_than_many_blocks(tmp_path):
    packer = BlockPacker(tmp_path, seq_len=8, blocks_per_file=2)
    packer.add_document(np.arange(1, 100, dtype=np.int32))
    stats = packer.close()
    sample_ids, blocks = read_blocks(tmp_path)
    assert stats["blocks"] == 12 and stats["dropped_tail_tokens"] == 3
    np.testing.assert_array_equal(blocks.reshape(-1), np.arange(1, 97))
