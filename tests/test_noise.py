"""The noise stream: Triton parity, determinism, independence of (tick, layer, row), statistics,
world-size invariance, the σ schedule and the context's row ids."""

import pytest
import torch
import triton
import triton.language as tl

from pipeline.kernels import native
from pipeline.noise import NoiseContext, active_noise_context, noise_context, normal, offsets, sigma_at, stream_key
from pipeline.noise.philox import philox_normal, philox_words


@triton.jit
def _triton_stream(out_words, out_normals, key, offsets_ptr, count, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < count
    counter = tl.load(offsets_ptr + index, mask=mask)
    word0, word1, _, _ = tl.randint4x(key, counter)
    tl.store(out_words + 2 * index, word0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(out_words + 2 * index + 1, word1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(out_normals + index, tl.randn(key, counter), mask=mask)


def test_torch_philox_matches_triton_randn():
    counters = torch.cat([torch.tensor([0, 1, 2**32 - 1, 2**32, 2**40 + 7]),
                          torch.randint(0, 2**45, (4000,), generator=torch.Generator().manual_seed(0))])
    key = stream_key(seed=1234, tick=17, layer=5)
    words = torch.zeros(2 * counters.numel(), dtype=torch.int64)
    normals = torch.zeros(counters.numel())
    _triton_stream[(triton.cdiv(counters.numel(), 1024),)](words, normals, key, counters, counters.numel(), BLOCK=1024)
    word0, word1 = philox_words(key, counters)
    assert torch.equal(words[0::2], word0) and torch.equal(words[1::2], word1)  # integers bit-exact
    assert (philox_normal(key, counters) - normals).abs().max().item() <= 2e-6


def test_same_inputs_give_bit_identical_noise():
    rows = torch.arange(64)
    assert torch.equal(normal(7, 3, 2, rows, 96), normal(7, 3, 2, rows, 96))


@pytest.mark.parametrize("change", ["seed", "tick", "layer", "row"])
def test_any_coordinate_changes_the_noise(change):
    base = dict(seed=7, tick=3, layer=2)
    rows = torch.arange(16)
    other = dict(base)
    other_rows = rows
    if change == "row":
        other_rows = rows + 16
    else:
        other[change] += 1
    a = normal(base["seed"], base["tick"], base["layer"], rows, 64)
    b = normal(other["seed"], other["tick"], other["layer"], other_rows, 64)
    assert not torch.isclose(a, b).any(), "overlapping values would mean correlated streams"


def test_statistics_over_many_draws():
    eps = normal(0, 0, 0, torch.arange(400), 512).double()  # 204 800 draws
    assert abs(eps.mean().item()) < 0.01
    assert abs(eps.std().item() - 1.0) < 0.01
    assert abs((eps**4).mean().item() - 3.0) < 0.1  # Gaussian kurtosis, not just matching moments 1-2


def test_batch_equals_its_halves_world_size_invariance():
    """Two ranks holding halves of a batch draw exactly what one rank drawing all of it draws."""
    sample_ids = torch.tensor([5, 9, 2, 14])
    context = NoiseContext(sigma=1.0, seed=3, tick=8, sample_ids=sample_ids)
    whole = normal(3, 8, 1, context.row_ids(torch.Size([4, 32])), 48)
    for half in (slice(0, 2), slice(2, 4)):
        rank_context = NoiseContext(sigma=1.0, seed=3, tick=8, sample_ids=sample_ids[half])
        assert torch.equal(normal(3, 8, 1, rank_context.row_ids(torch.Size([2, 32])), 48), whole[half])


def test_native_stream_matches_reference():
    if native.library() is None:
        pytest.skip("no C compiler: the torch path uses the reference ops directly")
    rows = torch.tensor([[0, 3], [1000, 77777]])
    key = stream_key(1, 2, 3)
    reference = philox_normal(key, offsets(rows, 300))
    fast = native.normal_rows(key, rows, 300)
    assert fast.shape == reference.shape
    assert (fast - reference).abs().max().item() <= 4e-6  # glibc vector logf/cosf vs torch's


def test_stream_key_is_in_one_triton_integer_type():
    keys = [stream_key(seed, tick, layer) for seed in (0, 1, 2**40) for tick in (0, 1, 10**6) for layer in (0, 31)]
    assert all(2**62 <= key < 2**63 for key in keys)
    assert len(set(keys)) == len(keys)
    with pytest.raises(ValueError, match="must be >= 0"):
        stream_key(0, -1, 0)


def test_sigma_schedule():
    assert sigma_at(0.2, 0.0, 1000) == 0.2
    assert sigma_at(0.2, 0.5, 0) == 0.2
    assert sigma_at(0.2, 0.5, 3) == pytest.approx(0.1)


def test_context_row_ids_and_switching():
    context = NoiseContext(sigma=0.1, seed=0, tick=0, sample_ids=torch.tensor([3, 0]))
    assert context.row_ids(torch.Size([2, 4])).tolist() == [[12, 13, 14, 15], [0, 1, 2, 3]]
    per_head = context.row_ids(torch.Size([2, 4, 2]))  # e.g. a per-head norm: heads fold into the row
    assert per_head[0, 1].tolist() == [26, 27] and per_head[1, 0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="batch of 2 sample ids"):
        context.row_ids(torch.Size([3, 4]))
    assert active_noise_context() is None
    with noise_context(context):
        assert active_noise_context() is context
        with noise_context(None):  # eval turns noise off inside a training step
            assert active_noise_context() is None
        assert active_noise_context() is context
    with noise_context(NoiseContext(sigma=0.0, seed=0, tick=0, sample_ids=torch.tensor([0]))):
        assert active_noise_context() is None  # σ = 0 is no noise at all
    assert active_noise_context() is None
