"""Exact resume at ZeRO-2 and ZeRO-3 after a checkpoint, through a corrupt and a partial newer
checkpoint: real Ray Train, DeepSpeed and MLflow on the 2-layer model, 2 workers, noise on, shuffled."""

import contextlib
import io
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline.noise import sigma_at
from pipeline.tracking.store import client_for
from pipeline.train import run_training
from pipeline.train.checkpoints import MANIFEST, checkpoint_tick, problem_with

from conftest import tiny_config

pytestmark = pytest.mark.slow

TICKS, EVERY, KEEP = 8, 2, 3
COMMON = [f"train.max_ticks={TICKS}", f"train.checkpoint_every={EVERY}", f"train.keep_checkpoints={KEEP}",
          "train.shuffle=true", "train.eval_every=0", "noise.sigma=0.2", "noise.decay=0.5", "noise.seed=3",
          "tracking.log_model=false"]


def history(outcome, name):
    points = client_for(outcome.tracking_uri).get_metric_history(outcome.run_id, name)
    return {m.step: m.value for m in points}


def run_checkpoints(run_dir):
    return sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def interrupted(request, ray_session, tmp_path_factory):
    """An uninterrupted run; its newest checkpoint then truncated and the one before made partial;
    a second run resumed from the run directory."""
    tmp = tmp_path_factory.mktemp(f"resume-zero{request.param}")
    overrides = [*COMMON, f"train.zero_stage={request.param}"]
    first = run_training(tiny_config(tmp, *overrides))
    run_dir = first.checkpoint_dir.parent
    kept = run_checkpoints(run_dir)
    kept_ticks = [checkpoint_tick(p) for p in kept]
    problems_before = [problem_with(p) for p in kept]
    manifests_before = [sorted(m.name for m in p.glob("pipeline_manifest.rank*.json")) for p in kept]
    newest, before = kept[-1], kept[-2]
    weights = max((p for p in newest.rglob("*optim_states.pt")), key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a crash half-way through a copy
    (before / MANIFEST.format(rank=1)).unlink()  # rank 1 never committed
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        resumed = run_training(tiny_config(tmp / "again", *overrides, f"train.resume_from={run_dir}"))
    return {"first": first, "resumed": resumed, "kept": kept, "kept_ticks": kept_ticks,
            "problems_before": problems_before,
            "manifests_before": manifests_before, "printed": printed.getvalue(), "newest": newest, "before": before}


def test_only_the_last_k_checkpoints_are_kept_and_each_verifies(interrupted):
    assert interrupted["kept_ticks"] == [TICKS - EVERY * i for i in reversed(range(KEEP))]  # [4, 6, 8]
    assert interrupted["problems_before"] == [None] * KEEP
    assert interrupted["manifests_before"] == [["pipeline_manifest.rank0.json", "pipeline_manifest.rank1.json"]] * KEEP


def test_corrupt_and_partial_newest_checkpoints_are_named_and_skipped(interrupted):
    printed = interrupted["printed"]
    assert f"{interrupted['newest']} is corrupt or partial" in printed and "bytes, the manifest says" in printed
    assert f"{interrupted['before']} is corrupt or partial (no manifest from rank(s) 1 of 2)" in printed
    assert "resuming from" in printed and "(tick 4) instead" in printed


def test_resumed_losses_equal_the_uninterrupted_run(interrupted):
    first, resumed = interrupted["first"], interrupted["resumed"]
    assert sorted(history(resumed, "tick")) == list(range(5, TICKS + 1)), "resumed at tick 4, not at 0"
    # The tick drives the noise: the resumed run continues the schedule (logged at t+1 for tick t's step).
    assert history(resumed, "noise_sigma")[5] == pytest.approx(sigma_at(0.2, 0.5, 4))
    original, again = history(first, "loss"), history(resumed, "loss")
    worst = max(abs(again[t] - original[t]) / abs(original[t]) for t in range(5, TICKS + 1))
    print(f"resume: largest relative loss difference over ticks 5-{TICKS}: {worst:.2e}")
    for tick in range(5, TICKS + 1):
        assert again[tick] == pytest.approx(original[tick], rel=1e-5), f"tick {tick}"
    assert resumed.metrics["eval_loss"] == pytest.approx(first.metrics["eval_loss"], rel=1e-5)


def test_checkpoint_saved_after_a_load_exports_the_same_weights(interrupted):
    """DeepSpeed #1748: load_checkpoint then save_checkpoint broke ZeRO-3 checkpoints. The resumed run
    saved ticks 6 and 8 after loading tick 4; its final one must verify and consolidate to the
    uninterrupted run's weights."""
    first, resumed = interrupted["first"], interrupted["resumed"]
    assert problem_with(resumed.checkpoint_dir) is None
    assert checkpoint_tick(resumed.checkpoint_dir) == TICKS
    a, b = (load_file(str(next(o.model_dir.glob("*.safetensors")))) for o in (first, resumed))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    shutil.rmtree(interrupted["kept"][0].parent, ignore_errors=True)  # the largest files of this module
