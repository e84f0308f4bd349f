"""The packed cache without Ray: blocks addressed by sample id over token files, and the tick order."""

import itertools

import numpy as np
import pytest

from pipeline.data.blocks import BlockReader, TokenFile, layout
from pipeline.data.order import SampleOrder, permute


def read_all(reader: BlockReader):
    """Every block of a split, in sample-id order: (sample ids, blocks)."""
    sample_ids = np.arange(reader.blocks)
    return sample_ids, reader.read(sample_ids)


def token_files(tmp_path, streams):
    files = []
    for index, stream in enumerate(streams):
        path = tmp_path / f"chunk-{index}.bin"
        data = np.asarray(stream, dtype="<i4").tobytes()
        path.write_bytes(data)
        files.append(TokenFile(str(path), len(stream), len(data), ""))
    return files


def test_blocks_keep_every_token_in_order_with_eos_between_documents(tmp_path):
    eos = 0
    rng = np.random.default_rng(0)
    documents = [np.append(rng.integers(1, 100, size=n), eos).astype(np.int32) for n in rng.integers(1, 40, size=50)]
    chunks = [np.concatenate(documents[i:i + 7]) for i in range(0, 50, 7)]  # blocks cross chunk borders
    files = token_files(tmp_path, chunks)
    reader = BlockReader(files, seq_len=16)

    stream = np.concatenate(documents)
    _, blocks = read_all(reader)
    split = layout(files, 16)
    assert split.tokens == len(stream)
    assert split.blocks == len(stream) // 16 == len(blocks) == reader.blocks
    assert split.dropped_tail_tokens == len(stream) % 16
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: len(blocks) * 16])
    # EOS sits exactly at each document's end, and nowhere else.
    ends = np.cumsum([len(d) for d in documents]) - 1
    packed = blocks.reshape(-1)
    np.testing.assert_array_equal(np.flatnonzero(packed == eos), ends[ends < len(packed)])


def test_the_same_blocks_whatever_the_chunking_and_in_any_order(tmp_path):
    stream = np.arange(1, 500, dtype=np.int32)
    (tmp_path / "one").mkdir()
    one = BlockReader(token_files(tmp_path / "one", [stream]), seq_len=8)
    (tmp_path / "many").mkdir()
    cuts = [0, 3, 90, 91, 250, 499]  # a file shorter than a block, one of a single token
    many = BlockReader(token_files(tmp_path / "many", [stream[a:b] for a, b in itertools.pairwise(cuts)]), seq_len=8)
    assert one.blocks == many.blocks == 62
    np.testing.assert_array_equal(read_all(one)[1], read_all(many)[1])
    picked = [61, 0, 11, 11, 30]
    np.testing.assert_array_equal(many.read(picked), stream[:62 * 8].reshape(62, 8)[picked])
    assert many.samples_read == 62 + 5
    with pytest.raises(IndexError, match=r"\[0, 62\)"):
        many.read([62])


@pytest.mark.parametrize("size", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_the_permutation_is_a_bijection(size):
    values = permute(np.arange(size), size, key=12345)
    assert sorted(values.tolist()) == list(range(size))
    if size > 16:
        assert not np.array_equal(values, np.arange(size))
        assert not np.array_equal(values, permute(np.arange(size), size, key=12346))


def test_a_tick_batch_is_a_pure_function_of_seed_epoch_and_tick():
    order = SampleOrder(blocks=10**12, global_batch=512, seed=7)
    np.testing.assert_array_equal(order.batch(123_456_789), SampleOrder(10**12, 512, 7).batch(123_456_789))
    assert len(set(order.batch(5).tolist())) == 512
    assert not np.array_equal(order.batch(5), SampleOrder(10**12, 512, 8).batch(5))
    # (seed, epoch) pairs do not collide: seed 0's epoch 1 is not seed 1's epoch 0.
    assert not np.array_equal(SampleOrder(100, 8, seed=0).batch(12), SampleOrder(100, 8, seed=1).batch(0))


def test_every_epoch_is_a_fresh_permutation_with_an_exact_boundary():
    order = SampleOrder(blocks=103, global_batch=8, seed=3)
    assert order.ticks_per_epoch == 12  # 96 samples per epoch; the remainder rule leaves 7 out
    epochs = [np.concatenate([order.batch(t) for t in range(e * 12, (e + 1) * 12)]) for e in range(3)]
    for epoch, ids in enumerate(epochs):
        assert len(ids) == 96 and len(set(ids.tolist())) == 96, f"epoch {epoch} repeats a sample"
        assert order.epoch(epoch * 12) == order.epoch(epoch * 12 + 11) == epoch
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    left_out = [set(range(103)) - set(ids.tolist()) for ids in epochs]
    assert all(len(rest) == 7 for rest in left_out) and left_out[0] != left_out[1]
    unshuffled = SampleOrder(blocks=103, global_batch=8, seed=3, shuffle=False)
    np.testing.assert_array_equal(unshuffled.batch(13), np.arange(8, 16))  # epoch 1, tick 1: in stored order


def test_a_reader_keeps_a_bounded_number_of_files_open(tmp_path):
    from pipeline.data.blocks import OPEN_FILES

    stream = np.arange(1, 3 * OPEN_FILES * 8 + 1, dtype=np.int32)
    reader = BlockReader(token_files(tmp_path, np.split(stream, 3 * OPEN_FILES)), seq_len=8)  # a block per file
    order = np.random.default_rng(0).permutation(reader.blocks)
    np.testing.assert_array_equal(reader.read(order), stream.reshape(-1, 8)[order])
    assert len(reader._handles) <= OPEN_FILES
    reader.close()
