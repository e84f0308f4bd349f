"""The training loop in one process, without Ray: resume at tick k reads nothing before tick k and
continues the very same losses (ZeRO-2 and ZeRO-3), and the noise reaches training."""

import pytest

from pipeline.data import prepare
from pipeline.train.local import train_in_process
from pipeline.train.rank import WorkerPlan

from conftest import tiny_config

TICKS, GLOBAL_BATCH = 6, 8


def run(tmp, name, *overrides):
    cfg = tiny_config(tmp, "train.num_workers=1", f"train.micro_batch_size={GLOBAL_BATCH}", f"train.max_ticks={TICKS}",
                      "train.eval_every=1", "train.eval_batches=1", "train.lr=1e-2", *overrides)
    model_ref, data = prepare(cfg)
    return train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp / name)))


def losses(reporter):
    return {int(r["tick"]): r["loss"] for r in reporter.reports}


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    """The tiny corpus packed once (preparing needs Ray; training here does not)."""
    prepare(tiny_config(tmp_path_factory.mktemp("prepare")))


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_at_tick_k_reads_nothing_before_it_and_continues_the_losses(prepared, tmp_path, stage):
    noisy = ("noise.sigma=0.1", f"train.zero_stage={stage}", "train.checkpoint_every=3")
    whole = run(tmp_path, "whole", *noisy)
    assert whole.samples_read == TICKS * GLOBAL_BATCH
    checkpoint = whole.checkpoints[0]
    assert checkpoint.endswith("checkpoint_000003")
    resumed = run(tmp_path, "resumed", *noisy, f"train.resume_from={checkpoint}")
    assert resumed.samples_read == (TICKS - 3) * GLOBAL_BATCH  # ticks 3, 4, 5 only: no replay
    assert sorted(losses(resumed)) == [4, 5, 6]
    for tick, loss in losses(resumed).items():
        assert loss == pytest.approx(losses(whole)[tick], rel=1e-6), tick
    assert resumed.reports[-1]["eval_loss"] == pytest.approx(whole.reports[-1]["eval_loss"], rel=1e-6)


def test_the_noise_reaches_training(prepared, tmp_path):
    quiet, noisy = losses(run(tmp_path, "quiet")), losses(run(tmp_path, "noisy", "noise.sigma=0.1"))
    assert quiet[1] == pytest.approx(noisy[1], rel=0.05)  # the same samples, the same model
    # Far above the 1e-5 within which the same run on 1 or 2 workers agrees, and growing as it trains.
    differences = [abs(noisy[t] - quiet[t]) / quiet[t] for t in sorted(quiet)]
    assert min(differences) > 2e-5 and max(differences) > 3e-4, differences
    again = losses(run(tmp_path, "noisy-again", "noise.sigma=0.1"))
    assert again == pytest.approx(noisy, rel=1e-6)  # and ε is the same draw every time


def saved_activation_bytes(model, input_ids) -> int:
    """What autograd keeps for the backward pass of one forward (activations, mostly)."""
    import torch

    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, labels=input_ids)
    return saved


def test_gradient_checkpointing_trains_the_same_losses_with_less_kept_for_backward(prepared, tmp_path):
    import torch

    from pipeline.models import materialize_model
    from pipeline.train.rank import build_model

    plain = losses(run(tmp_path, "plain", "noise.sigma=0.1"))
    checkpointed = losses(run(tmp_path, "checkpointed", "noise.sigma=0.1", "train.gradient_checkpointing=true"))
    assert checkpointed == pytest.approx(plain, rel=1e-6)  # recomputation draws the same noise
    kept = {}
    for enabled in (False, True):
        cfg = tiny_config(tmp_path, f"train.gradient_checkpointing={str(enabled).lower()}")
        model, _ = build_model(cfg, materialize_model(cfg.model))
        model.train()
        kept[enabled] = saved_activation_bytes(model, torch.randint(0, 500, (8, 64)))
    assert kept[True] < 0.5 * kept[False], kept


def test_the_attention_implementation_reaches_the_model(prepared, tmp_path):
    from pipeline.models import materialize_model
    from pipeline.train.rank import build_model

    cfg = tiny_config(tmp_path, "model.attn_implementation=eager")
    model, _ = build_model(cfg, materialize_model(cfg.model))
    assert model.config._attn_implementation == "eager"
    eager, sdpa = losses(run(tmp_path, "eager", "model.attn_implementation=eager")), losses(run(tmp_path, "sdpa"))
    assert eager == pytest.approx(sdpa, rel=1e-5)  # the same function, another kernel
