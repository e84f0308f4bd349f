"""Checkpoint manifests on real files: what counts as complete, and which checkpoint a resume picks."""

import json

import pytest
from test_storage_checkpoints import upload_checkpoint

from pipeline.train.checkpoints import (
    MANIFEST,
    CheckpointError,
    checkpoint_tick,
    choose_checkpoint,
    describe_fallback,
    problem_with,
    resume_point,
)


def make_checkpoint(run_dir, name, tick, world_size=2):
    """What a worker group leaves: each rank's files, uploaded with its manifest last."""
    upload_checkpoint(run_dir / f".stage-{name}", str(run_dir / name), tick, world_size)
    return run_dir / name


@pytest.fixture
def run_dir(tmp_path):
    for index, tick in enumerate((2, 4, 6)):
        make_checkpoint(tmp_path, f"checkpoint_2026-11-24_10-00-0{index}.000000", tick)
    return tmp_path


def test_a_complete_checkpoint_verifies_and_names_its_tick(run_dir):
    newest = run_dir / "checkpoint_2026-11-24_10-00-02.000000"
    assert problem_with(newest) is None and checkpoint_tick(newest) == 6
    manifest = json.loads((newest / MANIFEST.format(rank=1)).read_text())
    assert set(manifest["files"]) == {"pipeline_tag", "tick-000006/rank1_states.pt"}
    assert choose_checkpoint(run_dir) == (str(newest), [])  # locations: local paths or URIs


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / MANIFEST.format(rank=0)).unlink(), "no manifest from rank(s) 0 of 2"),
    (lambda d: [p.unlink() for p in d.glob("pipeline_manifest*")], "no manifest"),
    (lambda d: (d / "tick-000006" / "rank1_states.pt").unlink(), "tick-000006/rank1_states.pt is missing"),
    (lambda d: (d / "tick-000006" / "rank0_states.pt").write_bytes(b"\0" * 10), "has 10 bytes, the manifest says 2000"),
    (lambda d: (d / "tick-000006" / "rank0_states.pt").write_bytes(b"\1" * 2000), "does not match its SHA-256"),
    (lambda d: (d / MANIFEST.format(rank=1)).write_text("{not json"), "unreadable manifest"),
], ids=["rank-missing", "no-manifest", "file-missing", "truncated", "bit-rot", "bad-manifest"])
def test_damage_to_the_newest_falls_back_to_the_previous_with_a_warning(run_dir, damage, problem):
    newest = run_dir / "checkpoint_2026-11-24_10-00-02.000000"
    damage(newest)
    assert problem in problem_with(newest)
    chosen, skipped = choose_checkpoint(run_dir)
    assert chosen == str(run_dir / "checkpoint_2026-11-24_10-00-01.000000")
    assert [s.path for s in skipped] == [str(newest)]
    warning = describe_fallback(chosen, skipped)
    assert f"{newest} is corrupt or partial" in warning and "(tick 4) instead" in warning


def test_a_named_checkpoint_falls_back_only_to_older_ones(run_dir):
    middle = run_dir / "checkpoint_2026-11-24_10-00-01.000000"
    (middle / "pipeline_tag").unlink()  # listed in both manifests: the checkpoint is now incomplete
    chosen, skipped = choose_checkpoint(middle)
    assert chosen == str(run_dir / "checkpoint_2026-11-24_10-00-00.000000")
    assert [s.path for s in skipped] == [str(middle)]


def test_no_valid_checkpoint_is_an_error_listing_each(run_dir):
    for directory in run_dir.glob("checkpoint_*"):
        (directory / MANIFEST.format(rank=0)).unlink()
    with pytest.raises(CheckpointError, match=r"no valid checkpoint: .*10-00-02.* no manifest from rank\(s\) 0 of 2"):
        choose_checkpoint(run_dir)
    with pytest.raises(CheckpointError, match="holds no checkpoint directories"):
        choose_checkpoint(run_dir / "checkpoint_2026-11-24_10-00-00.000000" / "tick-000002")


def test_ticks_order_checkpoints_whatever_the_clock_said(tmp_path):
    """Ray names checkpoints by wall-clock time; after the clock went back, the name order lies."""
    make_checkpoint(tmp_path, "checkpoint_2026-11-24_10-00-00.000000", 6)  # written after the clock went back
    make_checkpoint(tmp_path, "checkpoint_2026-11-24_11-00-00.000000", 4)
    assert choose_checkpoint(tmp_path)[0] == str(tmp_path / "checkpoint_2026-11-24_10-00-00.000000")


def test_an_unreadable_newest_is_checked_and_named_first(run_dir):
    cut_short = run_dir / "checkpoint_2026-11-24_09-00-00.000000"  # no tag, no manifest yet
    (cut_short / "tick-000008").mkdir(parents=True)
    chosen, skipped = choose_checkpoint(run_dir)
    assert chosen == str(run_dir / "checkpoint_2026-11-24_10-00-02.000000")
    assert [s.path for s in skipped] == [str(cut_short)]


def test_resume_point_of_a_restarted_run(run_dir, tmp_path):
    import shutil

    elsewhere = str(tmp_path / "other-run" / "checkpoint_2026-11-20_10-00-00.000000")  # train.resume_from
    shutil.copytree(run_dir / "checkpoint_2026-11-24_10-00-00.000000", elsewhere)
    assert resume_point(None, elsewhere) == (elsewhere, [])  # verified where the ranks are
    empty = tmp_path / "fresh-run"
    empty.mkdir()
    assert resume_point(empty, None) == (None, [])  # a new run: nothing to resume
    assert resume_point(run_dir, elsewhere) == (str(run_dir / "checkpoint_2026-11-24_10-00-02.000000"), [])
    for directory in run_dir.glob("checkpoint_*"):  # every checkpoint of the run damaged
        (directory / MANIFEST.format(rank=1)).unlink()
    where, warnings = resume_point(run_dir, elsewhere)
    assert where == elsewhere and len(warnings) == 1
    assert warnings[0].startswith("warning: no valid checkpoint: ") and warnings[0].endswith(
        f"starting again from train.resume_from ({elsewhere})")
    assert resume_point(run_dir, None)[1][0].endswith("starting again from tick 0")
