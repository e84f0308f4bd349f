"""The same run on 1 or 2 Ray workers, in one process without Ray, and after an elastic 2 -> 1
restart: the same per-tick losses with the noise on and shuffling, on the same global batch."""

import pytest

from pipeline.data import prepare
from pipeline.tracking.store import client_for
from pipeline.train import run_training
from pipeline.train.local import train_in_process
from pipeline.train.rank import WorkerPlan

from conftest import tiny_config

pytestmark = pytest.mark.slow

TICKS, GLOBAL_BATCH = 6, 8
COMMON = ("noise.sigma=0.1", "train.shuffle=true", "train.zero_stage=2", f"train.max_ticks={TICKS}",
          "train.eval_every=0", "train.checkpoint_every=3", "train.lr=1e-2", "tracking.log_model=false")


def config(tmp, workers, *overrides):
    return tiny_config(tmp, f"train.num_workers={workers}", f"train.micro_batch_size={GLOBAL_BATCH // workers}",
                       *COMMON, *overrides)


def logged_losses(outcome):
    history = client_for(outcome.tracking_uri).get_metric_history(outcome.run_id, "loss")
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def two_workers(ray_session, tmp_path_factory):
    return run_training(config(tmp_path_factory.mktemp("two"), 2))


def test_one_and_two_workers_train_the_same_run(ray_session, two_workers, tmp_path):
    one = run_training(config(tmp_path, 1))
    two_losses, one_losses = logged_losses(two_workers), logged_losses(one)
    assert sorted(two_losses) == list(range(1, TICKS + 1))
    for tick in two_losses:
        assert one_losses[tick] == pytest.approx(two_losses[tick], rel=1e-5), tick
    assert one.metrics["eval_loss"] == pytest.approx(two_workers.metrics["eval_loss"], rel=1e-5)


def test_the_loop_in_this_process_trains_what_ray_trains(two_workers, tmp_path):
    cfg = config(tmp_path, 1)
    model_ref, data = prepare(cfg)
    local = train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp_path / "local")))
    two_losses = logged_losses(two_workers)
    reported = {int(r["tick"]): r["loss"] for r in local.reports}
    assert sorted(reported) == [3, 6]  # reported at each checkpoint
    for tick, loss in reported.items():
        assert loss == pytest.approx(two_losses[tick], rel=1e-5), tick


def test_a_two_worker_checkpoint_resumes_on_one_worker_with_the_same_losses(two_workers, tmp_path, capsys):
    at_three = next(p for p in two_workers.checkpoint_dir.parent.glob("checkpoint_*")
                    if p.is_dir() and (p / "pipeline_tag").read_text() == "tick-000003")
    resumed = run_training(config(tmp_path, 1, f"train.resume_from={at_three}"))
    assert "written by 2 ranks and 1 resume it" in capsys.readouterr().out
    two_losses, resumed_losses = logged_losses(two_workers), logged_losses(resumed)
    assert sorted(resumed_losses) == [4, 5, 6]
    for tick, loss in resumed_losses.items():
        assert loss == pytest.approx(two_losses[tick], rel=1e-5), tick


def test_a_worker_range_trains_the_same_run_on_the_workers_that_fit(ray_session, two_workers, tmp_path, capsys):
    """train.min_workers: 2 workers wanted, room for 1 (1.5 CPUs each on a 2-CPU Ray): Ray Train starts
    one, which accumulates 2 micro batches of 4 per tick, and the per-tick losses are the 2-worker run's."""
    ranged = run_training(config(tmp_path, 2, "train.min_workers=1", f"train.global_batch_size={GLOBAL_BATCH}",
                                 "train.cpus_per_worker=1.5"))
    assert "training on 1 of train.num_workers=2 workers: 2 micro batches of 4 per rank" in capsys.readouterr().out
    two_losses, ranged_losses = logged_losses(two_workers), logged_losses(ranged)
    assert sorted(ranged_losses) == list(range(1, TICKS + 1))
    for tick, loss in ranged_losses.items():
        assert loss == pytest.approx(two_losses[tick], rel=1e-5), tick
