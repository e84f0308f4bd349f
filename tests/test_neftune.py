"""NEFTune as a noise site: uniform noise α/√(L·d)·u on the input embedding's output, u from the
norms' Philox keying on a layer of its own, L each example's own length; the same for any split of
a batch over ranks; reaching a real training run (and never its evaluation); config errors."""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import kernels
from pipeline.config import ConfigError
from pipeline.data.blocks import IGNORE, BlockReader, PackPlan, TokenFile
from pipeline.models import attach_embedding_noise
from pipeline.noise import EMBEDDING_LAYER, NoiseContext, noise_context, signed_uniform, stream_key
from pipeline.noise.philox import philox_words
from pipeline.train.source import micro_batches

from conftest import tiny_config

HIDDEN, SEQ_LEN, ALPHA = 24, 16, 5.0


def tiny_llama(zero_embedding: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    if zero_embedding:  # the output is then the noise itself, exactly
        torch.nn.init.zeros_(model.get_input_embeddings().weight)
    attach_embedding_noise(model)
    return model.train()


def write_stream(path, examples: list[list[int]], labelled: bool = True) -> list[TokenFile]:
    """An example stream as the cache holds it: (id, label) int32 pairs; labels -100 on each example's
    first token (nothing in the block predicts it), as the encoder labels them."""
    if labelled:
        pairs = [np.stack([e, [IGNORE] + e[1:]], axis=1).reshape(-1) for e in map(list, examples)]
        values = np.concatenate(pairs)
    else:
        values = np.concatenate([np.asarray(e) for e in examples])
    path.write_bytes(values.astype("<i4").tobytes())
    return [TokenFile(str(path), sum(map(len, examples)), path.stat().st_size, "")]


def random_examples(lengths, seed=0) -> list[list[int]]:
    generator = np.random.default_rng(seed)
    return [generator.integers(3, 200, n).tolist() for n in lengths]


def reference_noise(seed, tick, sample_ids, lengths: np.ndarray, alpha, d) -> np.ndarray:
    """NEFTune's noise from its definition, independently of pipeline.noise's helpers: Philox's first word
    for counter (sample_id·seq_len + position)·d + channel, Triton's word -> [0, 1) map, 2u − 1, and the
    scale α/√(L·d) with each token's own L (0: no noise)."""
    seq_len = lengths.shape[1]
    row = np.asarray(sample_ids)[:, None] * seq_len + np.arange(seq_len)[None, :]
    counters = row[..., None] * d + np.arange(d)
    word, _ = philox_words(stream_key(seed, tick, EMBEDDING_LAYER), torch.from_numpy(counters))
    signed = word.numpy().astype(np.uint32).view(np.int32)
    folded = np.where(signed < 0, ~signed, signed)
    u = folded.astype(np.float32) * np.float32(4.6566127342e-10)
    scale = np.where(lengths > 0, alpha / np.sqrt(np.maximum(lengths, 1) * d), 0.0).astype(np.float32)
    return (u * np.float32(2.0) - np.float32(1.0)) * scale[..., None]


def embedded(model, batch, context) -> torch.Tensor:
    with torch.no_grad(), noise_context(context):
        return model.get_input_embeddings()(batch.input_ids)


def neftune(batch, seed=7, tick=2, alpha=ALPHA) -> NoiseContext:
    return NoiseContext(sigma=0.0, seed=seed, tick=tick, sample_ids=batch.sample_ids, neftune_alpha=alpha,
                        example_lengths=batch.example_lengths())


@pytest.fixture(params=[True, False], ids=["native", "torch"])
def native_switch(request, monkeypatch):
    """The CPU draw through the native kernel, or torch Philox (what a machine without a C compiler runs)."""
    from pipeline.kernels import native

    monkeypatch.setenv("PIPELINE_NATIVE_NORM", "1" if request.param else "0")
    native.library.cache_clear()
    yield request.param
    native.library.cache_clear()


def test_packed_examples_get_uniform_noise_scaled_by_their_own_length_and_padding_none(tmp_path, native_switch):
    # Block 0: examples of 5 and 7 tokens, then 4 padding; block 1: 9 + 7 tokens, full (no padding).
    examples = random_examples([5, 7, 9, 7])
    plan = PackPlan.next_fit(np.array([len(e) for e in examples]), SEQ_LEN)
    assert plan.first.tolist() == [0, 2, 4]
    reader = BlockReader(write_stream(tmp_path / "stream.bin", examples), SEQ_LEN, labelled=True, plan=plan)
    [batch] = micro_batches(reader, np.array([1, 0]), 2)
    lengths = np.array([[9] * 9 + [7] * 7, [5] * 5 + [7] * 7 + [0] * 4])
    assert batch.example_lengths().tolist() == lengths.tolist()

    noise = embedded(tiny_llama(zero_embedding=True), batch, neftune(batch)).numpy()
    expected = reference_noise(7, 2, [1, 0], lengths, ALPHA, HIDDEN)
    assert np.array_equal(noise, expected)  # bit for bit, native kernel or torch
    assert (noise[1, 12:] == 0).all() and (noise[1, :12] != 0).all()  # padding: none
    for row, segment, length in [(1, slice(0, 5), 5), (1, slice(5, 12), 7), (0, slice(0, 9), 9)]:
        scaled = noise[row, segment] / (ALPHA / math.sqrt(length * HIDDEN))
        assert np.abs(scaled).max() <= 1.0 + 1e-6 and np.abs(scaled).max() > 0.95, (row, length)
    # The kernel's draw is the torch reference's, also where d is not a multiple of the native chunk.
    ids = torch.arange(6).view(2, 3) + 40
    assert torch.equal(kernels.signed_uniform(123 | 1 << 62, ids, 100), signed_uniform(123 | 1 << 62, ids, 100))


def test_example_lengths_follow_the_packing(tmp_path):
    examples = random_examples([5, 7, 9])
    one_each = PackPlan.next_fit(np.array([5, 7, 9]), SEQ_LEN, one_per_block=True)
    padded = BlockReader(write_stream(tmp_path / "none.bin", examples), SEQ_LEN, labelled=True, plan=one_each)
    [batch] = micro_batches(padded, np.array([0, 2]), 2)  # packing: none, one example per block
    assert batch.example_lengths().tolist() == [[5] * 5 + [0] * 11, [9] * 9 + [0] * 7]
    naive = BlockReader(write_stream(tmp_path / "naive.bin", examples), 8, labelled=True)  # no positions
    assert micro_batches(naive, np.array([1]), 1)[0].example_lengths().tolist() == [[8] * 8]
    text = BlockReader(write_stream(tmp_path / "text.bin", examples, labelled=False), 8)  # raw text
    assert micro_batches(text, np.array([0, 1]), 2)[0].example_lengths().tolist() == [[8] * 8] * 2


def test_a_samples_noise_is_the_same_however_the_batch_is_split_and_changes_with_tick_and_seed(tmp_path):
    examples = random_examples([5, 7, 9, 7, 3, 12, 16, 6, 6], seed=1)
    plan = PackPlan.next_fit(np.array([len(e) for e in examples]), SEQ_LEN)
    reader = BlockReader(write_stream(tmp_path / "stream.bin", examples), SEQ_LEN, labelled=True, plan=plan)
    assert reader.blocks == 5  # [5, 7], [9, 7], [3, 12], [16], [6, 6]
    model = tiny_llama()
    [whole] = micro_batches(reader, np.array([0, 1, 2, 3]), 4)  # one rank, one micro batch of 4
    together = embedded(model, whole, neftune(whole))
    halves = [micro_batches(reader, np.array(ids), 2)[0] for ids in ([3, 1], [2, 0])]  # 2 ranks, another order
    for half in halves:
        apart = embedded(model, half, neftune(half))
        for row, sample in enumerate(half.sample_ids.tolist()):
            assert torch.equal(apart[row], together[sample]), sample
    clean = embedded(model, whole, None)
    noise = together - clean
    assert noise.abs().max() > 0.01
    for other in (neftune(whole, tick=3), neftune(whole, seed=8)):
        assert not torch.allclose(embedded(model, whole, other) - clean, noise, atol=1e-3)


def test_the_hook_adds_noise_only_in_training_under_a_positive_alpha_and_lets_gradients_through(tmp_path):
    examples = random_examples([5, 7, 9, 7])
    plan = PackPlan.next_fit(np.array([len(e) for e in examples]), SEQ_LEN)
    reader = BlockReader(write_stream(tmp_path / "stream.bin", examples), SEQ_LEN, labelled=True, plan=plan)
    [batch] = micro_batches(reader, np.array([0, 1]), 2)
    model = tiny_llama()
    attach_embedding_noise(model)  # a second call is a no-op: the noise is added once
    clean = embedded(model, batch, None)
    noisy = embedded(model, batch, neftune(batch))
    expected = reference_noise(7, 2, [0, 1], batch.example_lengths().numpy(), ALPHA, HIDDEN)
    torch.testing.assert_close(noisy - clean, torch.from_numpy(expected), rtol=0, atol=1e-6)
    norms_only = NoiseContext(sigma=0.1, seed=7, tick=2, sample_ids=batch.sample_ids)  # site norm
    assert torch.equal(embedded(model, batch, norms_only), clean)
    assert torch.equal(embedded(model, batch, neftune(batch, alpha=0.0)), clean)  # α = 0: off
    model.eval()
    assert torch.equal(embedded(model, batch, neftune(batch)), clean)  # evaluation: never
    model.train()
    embedding, upstream = model.get_input_embeddings(), torch.randn(clean.shape)
    grads = []
    for context in (None, neftune(batch)):  # the noise is additive: the same gradient with or without it
        embedding.weight.grad = None
        with noise_context(context):
            (embedding(batch.input_ids) * upstream).sum().backward()
        grads.append(embedding.weight.grad)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


# Real training, in this process (no Ray: the data is written here as the cache holds it).
TICKS, BATCH, TRAIN_SEQ = 2, 4, 64


def synthetic_data(tmp, examples: bool):
    """PreparedData over random tokens: raw text blocks, or prompt/response examples packed by document."""
    from pipeline.data.prepare import PreparedData

    files, plans, stats = {}, {}, {}
    for split, count in (("train", 24), ("eval", 8)):
        if examples:
            lengths = np.random.default_rng(len(split)).integers(6, 40, count * 3)
            plan = PackPlan.next_fit(lengths, TRAIN_SEQ)
            (tmp / f"{split}.plan").write_bytes(plan.to_bytes())
            plans[split] = {"location": str(tmp / f"{split}.plan")}
            files[split] = write_stream(tmp / f"{split}.bin", random_examples(lengths, seed=len(split)))
            stats[split] = {"blocks": plan.blocks}
        else:
            files[split] = write_stream(tmp / f"{split}.bin", random_examples([TRAIN_SEQ] * count), labelled=False)
            stats[split] = {"blocks": count}
    return PreparedData(root=str(tmp), fingerprint="synthetic", seq_len=TRAIN_SEQ, stats=stats, cache_hit=True,
                        bad_records={}, bad_examples={}, token_files=files, labelled=examples, plans=plans)


@pytest.fixture(scope="module")
def model_ref(tmp_path_factory) -> str:
    from pipeline.models import materialize_model

    return materialize_model(tiny_config(tmp_path_factory.mktemp("model")).model)


def train(tmp, model_ref, name, examples, *overrides, checkpoints: list | None = None):
    from pipeline.train.local import train_in_process
    from pipeline.train.rank import WorkerPlan

    fmt = ("data.format=prompt_completion",) if examples else ()
    cfg = tiny_config(tmp, *fmt, "train.num_workers=1", f"train.micro_batch_size={BATCH}", f"train.max_ticks={TICKS}",
                      "train.eval_every=1", "train.eval_batches=1", f"data.seq_len={TRAIN_SEQ}", *overrides)
    (tmp / f"data-{name}").mkdir()
    data = synthetic_data(tmp / f"data-{name}", examples)
    reporter = train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp / name)))
    if checkpoints is not None:
        checkpoints.extend(reporter.checkpoints)
    return [(r["tick"], r["loss"], r["eval_loss"], r["eval_loss_start"]) for r in reporter.reports]


@pytest.mark.parametrize("examples", [False, True], ids=["text", "packed-examples"])
def test_neftune_reaches_training_but_not_evaluation_and_repeats_exactly(tmp_path, model_ref, examples):
    quiet = train(tmp_path, model_ref, "quiet", examples, "noise.site=embedding", "noise.neftune_alpha=0")
    noisy = train(tmp_path, model_ref, "noisy", examples, "noise.site=embedding", "noise.neftune_alpha=15")
    assert [tick for tick, *_ in noisy] == [1, 2]
    (_, quiet_loss, _, quiet_start), (_, noisy_loss, _, noisy_start) = quiet[0], noisy[0]
    assert noisy_start == quiet_start  # the tick-0 evaluation: the same model, no noise
    # Tick 1's forward ran on noisy embeddings: 10x further off than the 1e-5 within which the same run
    # agrees on 1 or 2 workers (random tokens leave the loss near log(vocab) either way).
    assert abs(noisy_loss - quiet_loss) > 1e-4 * quiet_loss, (noisy_loss, quiet_loss)
    assert noisy[-1][2] != quiet[-1][2]  # and so the model it trained evaluates differently
    norm_site = train(tmp_path, model_ref, "norm-site", examples, "noise.neftune_alpha=15")  # site norm: ignored
    assert norm_site == quiet
    again = train(tmp_path, model_ref, "noisy-again", examples, "noise.site=embedding", "noise.neftune_alpha=15")
    assert again == noisy  # the same draw every time


def test_both_sites_at_zero3_resume_into_the_same_losses(tmp_path, model_ref):
    both = ("noise.site=both", "noise.sigma=0.1", "noise.neftune_alpha=10", "train.zero_stage=3", "train.max_ticks=4",
            "train.checkpoint_every=2")
    saved = []
    whole = train(tmp_path, model_ref, "whole", True, *both, checkpoints=saved)
    assert saved[0].endswith("checkpoint_000002")
    resumed = train(tmp_path, model_ref, "resumed", True, *both, f"train.resume_from={saved[0]}")
    assert [tick for tick, *_ in resumed] == [3, 4]
    for got, wanted in zip(resumed, whole[2:]):  # ticks 3 and 4 draw the same noise after the resume
        assert got == pytest.approx(wanted, rel=1e-6)
    norms_only = train(tmp_path, model_ref, "norms-only", True, *both, "noise.neftune_alpha=0")
    assert norms_only[0][1] != whole[0][1]  # both sites: the embedding's noise on top of the norms'


def test_noise_config_names_the_field(tmp_path):
    cfg = tiny_config(tmp_path)
    assert (cfg.noise.site, cfg.noise.neftune_alpha, cfg.noise.embedding_alpha) == ("norm", 5.0, 0.0)
    both = tiny_config(tmp_path, "noise.site=both", "noise.sigma=0.1", "noise.neftune_alpha=10")
    assert (both.noise.sigma, both.noise.embedding_alpha) == (0.1, 10.0)
    assert tiny_config(tmp_path, "noise.site=embedding", "noise.neftune_alpha=0").noise.embedding_alpha == 0.0
    from pipeline.tune.space import check_space

    # A sweep over α with 0 (NEFTune off) for a baseline: every corner value validates.
    check_space(tiny_config(tmp_path, "noise.site=embedding", 'sweep.space={"noise.neftune_alpha": {"type": '
                            '"loguniform", "low": 1, "high": 15, "with_zero": true}}'))
    bad = {
        ("noise.neftune_alpha=-1",): r"noise\.neftune_alpha: Input should be greater than or equal to 0",
        ("noise.neftune_alpha=.inf",): r"noise\.neftune_alpha: Input should be a finite number",
        ("noise.site=embeddings",): r"noise\.site: Input should be 'norm', 'embedding' or 'both'",
        ("noise.site=embedding", "noise.sigma=0.1"): r"noise\.sigma: 0\.1 would be ignored: site 'embedding'",
    }
    for overrides, message in bad.items():
        with pytest.raises(ConfigError, match=message) as error:
            tiny_config(tmp_path, *overrides)
        assert "\n" not in str(error.value)
