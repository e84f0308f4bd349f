"""Checkpoint manifests in object storage (a real S3-compatible server, moto on 127.0.0.1): real
checkpoint files uploaded the way a worker uploads them (its manifest last), then verified, chosen,
fallen back from, downloaded and deleted as Ray's keep-K does."""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.train.checkpoints import (
    MANIFEST,
    SIZES_ONLY,
    CheckpointError,
    checkpoint_tick,
    choose_checkpoint,
    describe_fallback,
    local_checkpoint,
    problem_with,
    resume_point,
    write_manifest,
)

from servers import REQUEST_LINE

NAMES = [f"checkpoint_2026-12-01_10-00-0{i}.000000" for i in range(3)]
TICKS = (2, 4, 6)


def upload_checkpoint(staging_root: Path, location: str, tick: int, world_size: int = 2) -> None:
    """Each rank's DeepSpeed-like files written locally with their manifest, then uploaded into one
    directory with the manifest after everything else (pipeline.train.worker._upload does the same)."""
    for rank in range(world_size):
        staging = staging_root / f"{posixpath.basename(location)}-rank{rank}"
        (staging / f"tick-{tick:06d}").mkdir(parents=True)
        (staging / f"tick-{tick:06d}" / f"rank{rank}_states.pt").write_bytes(bytes([tick, rank]) * 1000)
        (staging / "pipeline_tag").write_text(f"tick-{tick:06d}")
        write_manifest(staging, rank, world_size, tick)
        storage.upload_dir(staging, location, last=[MANIFEST.format(rank=rank)])


@pytest.fixture
def run_dir(s3_env, tmp_path) -> str:
    run = f"s3://{s3_env.bucket('ckpt')}/ray/run-1"
    for name, tick in zip(NAMES, TICKS, strict=True):
        upload_checkpoint(tmp_path / "staging", storage.join(run, name), tick)
    return run


def key_of(location: str) -> tuple[str, str]:
    bucket, _, key = location.removeprefix("s3://").partition("/")
    return bucket, key


def requests(s3) -> list[tuple[str, str]]:
    """The server's access log, (method, path): every line, those it colours (206, 404) too."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", (s3.root / "moto.log").read_text(errors="replace"))
    return REQUEST_LINE.findall(text)


def test_a_complete_checkpoint_verifies_from_one_listing(run_dir, s3_env):
    newest = storage.join(run_dir, NAMES[2])
    start = len(requests(s3_env))
    assert problem_with(newest) is None
    seen = requests(s3_env)[start:]
    listings = [path for method, path in seen if method == "GET" and "list-type=2" in path]
    reads = [path for method, path in seen if method == "GET" and "list-type=2" not in path]
    opened = [path for method, path in seen if method == "HEAD"]  # pyarrow's, when it opens a file
    # One listing gives every size; then each manifest and each file is read once (its hash), the tag
    # that both ranks list included: nothing is asked file by file that the listing answered.
    assert len(listings) == 1 and len(seen) == 1 + len(reads) + len(opened)
    assert sorted(reads) == sorted(opened) == sorted(set(reads)) and len(reads) == 2 + 3
    assert checkpoint_tick(newest) == 6
    assert choose_checkpoint(run_dir) == (newest, [])
    assert choose_checkpoint(run_dir + "/") == (newest, [])  # a trailing slash names the same place


def test_the_upload_commits_with_the_manifest_last(s3_env, tmp_path):
    location = f"s3://{s3_env.bucket('order')}/ray/run/{NAMES[0]}"
    start = len(requests(s3_env))
    upload_checkpoint(tmp_path, location, tick=2, world_size=1)
    writes = [path for method, path in requests(s3_env)[start:] if method in ("PUT", "POST")]
    assert MANIFEST.format(rank=0) in writes[-1]  # the commit: the last object to appear
    assert problem_with(location) is None


def corrupt(location: str, s3_env, relative: str, data: bytes | None) -> None:
    """Replace (or with None, delete) one stored object behind the pipeline's back."""
    bucket, key = key_of(storage.join(location, relative))
    if data is None:
        s3_env.client().delete_object(Bucket=bucket, Key=key)
    else:
        s3_env.client().put_object(Bucket=bucket, Key=key, Body=data)


@pytest.mark.parametrize("relative, data, problem", [
    ("tick-000006/rank0_states.pt", b"\6\0" * 500, "rank0_states.pt has 1000 bytes, the manifest says 2000"),
    ("tick-000006/rank1_states.pt", None, "tick-000006/rank1_states.pt is missing"),
    (MANIFEST.format(rank=0), None, "no manifest from rank(s) 0 of 2"),
    ("tick-000006/rank0_states.pt", b"\1" * 2000, "tick-000006/rank0_states.pt does not match its SHA-256"),
    (MANIFEST.format(rank=1), b"{not json", "unreadable manifest"),
], ids=["truncated-shard", "missing-file", "missing-manifest", "bit-rot", "bad-manifest"])
def test_damage_is_named_and_the_previous_checkpoint_is_chosen(run_dir, s3_env, relative, data, problem):
    newest, previous = storage.join(run_dir, NAMES[2]), storage.join(run_dir, NAMES[1])
    corrupt(newest, s3_env, relative, data)
    assert problem in problem_with(newest)
    chosen, skipped = choose_checkpoint(run_dir)
    assert chosen == previous and [(s.path, problem in s.problem) for s in skipped] == [(newest, True)]
    warning = describe_fallback(chosen, skipped)
    assert f"{newest} is corrupt or partial" in warning and f"resuming from {previous} (tick 4) instead" in warning
    assert resume_point(run_dir, None) == (previous, [warning])


def test_a_checkpoint_without_any_manifest_is_partial(run_dir, s3_env):
    newest = storage.join(run_dir, NAMES[2])
    for rank in range(2):
        corrupt(newest, s3_env, MANIFEST.format(rank=rank), None)
    assert problem_with(newest) == "no manifest (partial, or not written by this pipeline)"
    assert choose_checkpoint(run_dir)[0] == storage.join(run_dir, NAMES[1])


def test_a_named_checkpoint_falls_back_only_to_older_ones(run_dir, s3_env):
    middle = storage.join(run_dir, NAMES[1])
    corrupt(middle, s3_env, "pipeline_tag", None)
    chosen, skipped = choose_checkpoint(middle)
    assert chosen == storage.join(run_dir, NAMES[0]) and [s.path for s in skipped] == [middle]


def test_resume_point_of_a_new_an_interrupted_and_a_ruined_run(run_dir, s3_env):
    fresh = f"s3://{s3_env.bucket('fresh')}/ray/run-2"
    newest = storage.join(run_dir, NAMES[2])
    assert resume_point(fresh, newest) == (newest, [])  # a new run: train.resume_from, verified
    assert resume_point(run_dir, None) == (storage.join(run_dir, NAMES[2]), [])
    for name in NAMES:
        corrupt(storage.join(run_dir, name), s3_env, MANIFEST.format(rank=1), None)
    where, warnings = resume_point(run_dir, None)
    assert where is None and warnings[0].startswith("warning: no valid checkpoint: ")
    assert warnings[0].endswith("starting again from tick 0")
    with pytest.raises(CheckpointError, match=r"no valid checkpoint: .*no manifest from rank\(s\) 1 of 2"):
        choose_checkpoint(run_dir)
    with pytest.raises(CheckpointError, match="holds no checkpoint directories"):
        choose_checkpoint(fresh)


def test_keeping_k_deletes_whole_checkpoints_and_leaves_the_rest_valid(run_dir):
    """Ray's checkpoint manager deletes an old checkpoint by (its filesystem, its path), as our upload
    function hands them back: the prefix goes, the others still verify."""
    from ray.train.v2._internal.execution.storage import delete_fs_path

    fs, oldest = storage.filesystem(storage.join(run_dir, NAMES[0]))
    delete_fs_path(fs=fs, fs_path=oldest)
    assert [posixpath.basename(d) for d in storage.subdirectories(run_dir)] == NAMES[1:]
    assert choose_checkpoint(run_dir) == (storage.join(run_dir, NAMES[2]), [])
    assert problem_with(storage.join(run_dir, NAMES[1])) is None


def test_a_remote_checkpoint_is_read_from_a_local_copy_removed_afterwards(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_LOCAL_CACHE", str(tmp_path / "node-cache"))
    newest = storage.join(run_dir, NAMES[2])
    with local_checkpoint(newest) as directory:
        assert directory.is_relative_to(tmp_path / "node-cache")
        assert problem_with(directory) is None and (directory / "pipeline_tag").read_text() == "tick-000006"
        manifest = json.loads((directory / MANIFEST.format(rank=1)).read_text())
        assert set(manifest["files"]) == {"pipeline_tag", "tick-000006/rank1_states.pt"}
    assert not directory.exists()
    local = tmp_path / "local-checkpoint"
    local.mkdir()
    with local_checkpoint(str(local)) as directory:  # a local checkpoint is used in place
        assert directory == local


def test_the_worker_upload_function_returns_a_checkpoint_ray_manages(s3_env, tmp_path, monkeypatch):
    """pipeline.train.worker._upload, Ray's checkpoint_upload_fn, against Ray's own StorageContext."""
    import ray.train
    from ray.train.v2._internal.execution.context import is_managed_checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from pipeline.train.worker import _upload

    fs, root = storage.filesystem(f"s3://{s3_env.bucket('managed')}/ray")
    ray_storage = StorageContext(storage_path=root, experiment_dir_name="run-3", storage_filesystem=fs)
    context = type("Context", (), {"get_storage": lambda self: ray_storage})()
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    run = storage.to_location(f"s3://{root}", ray_storage.experiment_fs_path)
    staging = tmp_path / "rank0"
    (staging / "tick-000002").mkdir(parents=True)
    (staging / "tick-000002" / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)
    (staging / "pipeline_tag").write_text("tick-000002")
    write_manifest(staging, 0, 1, 2)
    start = len(requests(s3_env))
    checkpoint = _upload(run, 0, ray.train.Checkpoint.from_directory(str(staging)), NAMES[0])
    writes = [path for method, path in requests(s3_env)[start:] if method in ("PUT", "POST")]
    assert MANIFEST.format(rank=0) in writes[-1]
    assert is_managed_checkpoint(ray_storage, checkpoint)
    assert storage.to_location(run, checkpoint.path) == storage.join(run, NAMES[0])
    assert problem_with(storage.join(run, NAMES[0])) is None and checkpoint_tick(storage.join(run, NAMES[0])) == 2


def test_ranks_hash_disjoint_shares_and_the_driver_hashes_nothing(run_dir, s3_env):
    newest = storage.join(run_dir, NAMES[2])
    corrupt(newest, s3_env, "tick-000006/rank1_states.pt", b"\1" * 2000)  # bit rot in rank 1's file
    start = len(requests(s3_env))
    assert problem_with(newest, SIZES_ONLY) is None  # sizes and manifests agree: only a hash can tell
    verdicts = [problem_with(newest, (rank, 2)) for rank in range(2)]
    assert verdicts[0] is None and "tick-000006/rank1_states.pt does not match its SHA-256" in verdicts[1]
    hashed = [path for method, path in requests(s3_env)[start:]
              if method == "GET" and "list-type=2" not in path and "pipeline_manifest" not in path]
    assert sorted(hashed) == sorted(set(hashed)) and len(hashed) == 3  # each file by one rank, once


def agree_on_rank(rank: int, world: int, init_file: str, run_dir: str, out: str) -> None:
    import torch.distributed as dist

    from pipeline.config import StorageConfig
    from pipeline.train.rank import _agreed_verdict

    storage.configure(StorageConfig())  # the bucket's endpoint and keys, from the inherited environment
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    Path(out, f"rank{rank}.json").write_text(json.dumps(resume_point(run_dir, None, _agreed_verdict(rank, world))))
    dist.destroy_process_group()


def test_two_ranks_verifying_their_shares_agree_to_skip_a_corrupt_shard(run_dir, s3_env, tmp_path):
    import torch.multiprocessing as mp

    newest, previous = storage.join(run_dir, NAMES[2]), storage.join(run_dir, NAMES[1])
    corrupt(newest, s3_env, "tick-000006/rank1_states.pt", b"\1" * 2000)  # only rank 1 hashes it
    mp.start_processes(agree_on_rank, args=(2, str(tmp_path / "init"), run_dir, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        chosen, warnings = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert chosen == previous
        assert f"{newest} is corrupt or partial (tick-000006/rank1_states.pt does not match" in warnings[0]
