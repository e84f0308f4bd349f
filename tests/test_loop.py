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
