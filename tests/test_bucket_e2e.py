"""`pipeline train`, a resume and `pipeline tune` with the corpus, the caches, checkpoints and model
outputs all in a bucket of a real S3-compatible server (moto on 127.0.0.1, credentials checked);
and bad storage input stopped in one line before training, leaving the bucket as it was."""

import os
import socket
import time
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.cli import main
from pipeline.config import StorageConfig
from pipeline.tracking.store import client_for
from pipeline.train.checkpoints import MANIFEST_GLOB, checkpoint_tick

from conftest import REPO

pytestmark = pytest.mark.slow

TINY_S3 = str(REPO / "configs" / "tiny-s3.yaml")


def bucket_run(tmp: Path, *overrides: str) -> list[str]:
    """configs/tiny-s3.yaml (everything in the bucket) with a local tracking store and a local copy of
    the shared model cache kept out of it; only the tracking store is on local disk."""
    return ["--config", TINY_S3, f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.log_model=false",
            "tracking.experiment=bucket", *overrides]


def history(uri: str, run_name: str, key: str = "loss") -> tuple[object, dict[int, float]]:
    client = client_for(uri)
    run = client.search_runs([client.get_experiment_by_name("bucket").experiment_id],
                             filter_string=f"attributes.run_name = '{run_name}'")[0]
    return run, {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def test_train_and_resume_with_everything_in_the_bucket(ray_with_s3, tiny_bucket, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["train", *bucket_run(tmp_path, "train.max_ticks=6", "train.checkpoint_every=2",
                                      "train.keep_checkpoints=3", "noise.sigma=0.1", "tracking.run_name=first")])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    run, losses = history(uri, "first")
    assert run.info.status == "FINISHED" and sorted(losses) == [1, 2, 3, 4, 5, 6]
    run_key = f"first-{run.info.run_id[:8]}"
    assert f"data cache s3://{tiny_bucket}/cache/" in out

    # Checkpoints, committed by both ranks' manifests, are in the bucket; keep-K kept the last 3.
    run_dir = f"s3://{tiny_bucket}/outputs/ray/{run_key}"
    checkpoints = storage.subdirectories(run_dir)
    ticks = sorted(checkpoint_tick(c) for c in checkpoints if c.rsplit("/", 1)[-1].startswith("checkpoint_"))
    assert ticks == [2, 4, 6]
    for checkpoint in checkpoints:
        if checkpoint.rsplit("/", 1)[-1].startswith("checkpoint_"):
            manifests = [f for f in storage.list_files(checkpoint) if Path(f.relative).match(MANIFEST_GLOB)]
            assert len(manifests) == 2
    model = {f.relative for f in storage.list_files(f"s3://{tiny_bucket}/outputs/{run_key}/model")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= model
    assert not list(Path.cwd().glob("s3:*")) and not list(REPO.glob("s3:*")), "a URI became a local directory"

    # Resume from the tick-4 checkpoint in the bucket: ticks 5 and 6 are trained again, exactly.
    tick4 = next(c for c in checkpoints if c.rsplit("/", 1)[-1].startswith("checkpoint_") and checkpoint_tick(c) == 4)
    code = main(["train", *bucket_run(tmp_path, "train.max_ticks=6", "train.checkpoint_every=2", "noise.sigma=0.1",
                                      "tracking.run_name=resumed"), "--resume", tick4])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "resumed from" in out and "at tick 4" in out
    resumed_run, resumed = history(uri, "resumed")
    assert resumed_run.info.status == "FINISHED" and sorted(resumed) == [5, 6]
    for tick in (5, 6):
        assert resumed[tick] == pytest.approx(losses[tick], rel=1e-6), (tick, resumed[tick], losses[tick])
    print(f"bucket resume: ticks 5-6 losses {[resumed[t] for t in (5, 6)]} vs {[losses[t] for t in (5, 6)]}")


def everything_in(bucket: str) -> set[tuple[str, int]]:
    return {(f.location, f.size) for f in storage.list_files(f"s3://{bucket}")}


@pytest.mark.parametrize("problem", ["missing bucket", "missing prefix", "wrong credentials", "unreachable endpoint"])
def test_bad_storage_is_one_line_before_ray_and_leaves_the_bucket_alone(ray_with_s3, tiny_bucket, tmp_path, capsys,
                                                                         monkeypatch, problem):
    from pipeline.config import load_config
    from pipeline.models import materialize_model

    materialize_model(load_config(TINY_S3).model)  # a complete model cache entry, as any earlier run leaves
    before = everything_in(tiny_bucket)
    overrides = []
    expected = ""
    if problem == "missing bucket":
        overrides, expected = ["train.output_dir=s3://no-such-bucket/outputs"], \
            "pipeline: train.output_dir: bucket 'no-such-bucket' does not exist"
    elif problem == "missing prefix":
        overrides, expected = [f"data.path=s3://{tiny_bucket}/no-such-corpus/"], \
            f"pipeline: data.path: no files match 's3://{tiny_bucket}/no-such-corpus/'"
    elif problem == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        expected = "pipeline: data.path: the storage refused access to s3://pipeline-tiny/corpus/17*.txt"
    else:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        overrides, expected = [f"storage.endpoint_url=http://127.0.0.1:{port}"], \
            f"pipeline: data.path: cannot reach the storage endpoint http://127.0.0.1:{port}"
    storage.configure(StorageConfig())
    started = time.monotonic()
    code = main(["train", *bucket_run(tmp_path, *overrides)])
    took = time.monotonic() - started
    storage.configure(StorageConfig())
    monkeypatch.undo()
    storage.configure(StorageConfig())
    # Building the tiny model (the first time the bucket's model cache is used) shows a progress bar first.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "model shards" not in line]
    assert code == 2 and len(err) == 1 and err[0].startswith(expected), err
    assert "not-the-secret" not in err[0] and os.environ["AWS_SECRET_ACCESS_KEY"] not in err[0]
    assert took < 20, f"{problem}: {took:.1f} s"
    assert everything_in(tiny_bucket) == before
    assert not (tmp_path / "mlflow.db").exists() or not client_for(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [client_for(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("bucket").experiment_id])


def test_a_damaged_token_file_in_the_bucket_stops_training_before_it_starts(ray_with_s3, tiny_bucket, tmp_path, capsys):
    s3 = ray_with_s3
    cache = f"s3://{tiny_bucket}/damaged-cache"
    assert main(["prepare", *bucket_run(tmp_path, f"data.cache_dir={cache}")]) == 0
    shard = next(f for f in storage.list_files(cache) if f.relative.endswith(".bin"))
    key = shard.location.removeprefix(f"s3://{tiny_bucket}/")
    body = s3.client().get_object(Bucket=tiny_bucket, Key=key)["Body"].read()
    s3.client().put_object(Bucket=tiny_bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 1]))
    capsys.readouterr()
    code = main(["train", *bucket_run(tmp_path, f"data.cache_dir={cache}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"pipeline: data.cache_dir: token file {shard.location} does not match its SHA-256 in meta.json "
                      f"(corrupt); delete {shard.location.rsplit('/', 2)[0]} to rebuild it")


def test_sweep_with_its_storage_in_the_bucket(ray_with_s3, tiny_bucket, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["tune", "--config", str(REPO / "configs" / "sweep-tiny.yaml"),
                 f"data.path=s3://{tiny_bucket}/corpus/17*.txt", f"data.cache_dir=s3://{tiny_bucket}/cache",
                 f"model.cache_dir=s3://{tiny_bucket}/models", f"train.output_dir=s3://{tiny_bucket}/outputs",
                 f"sweep.storage_dir=s3://{tiny_bucket}/sweeps", "sweep.name=bucket-sweep", "sweep.num_samples=2",
                 "train.max_ticks=2", "train.eval_every=2", "sweep.scheduler.grace_period=2",
                 f"tracking.uri={uri}", "tracking.log_model=false",
                 "sweep.confirm.seeds=0"])  # the confirmation stores nothing the search does not (test_tune has it)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    stored = {f.relative for f in storage.list_files(f"s3://{tiny_bucket}/sweeps/bucket-sweep")}
    assert {"sweep.json", "sweep-config.yaml", "report/trials.csv"} <= stored
    assert any(name.startswith("experiment_state") for name in stored)  # Tune's own state, for --resume
    trials = storage.subdirectories(f"s3://{tiny_bucket}/sweeps/bucket-sweep-trials")
    assert sorted(t.rsplit("/", 1)[1].startswith("trial-") for t in trials) == [False, True, True]
    shared = storage.list_files(f"s3://{tiny_bucket}/sweeps/bucket-sweep-trials/first-eval")
    assert len(shared) == 1 and shared[0].relative.endswith(".json")  # the trials' one tick-0 evaluation
    client = client_for(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny-sweep").experiment_id])
    statuses = sorted(r.info.status for r in runs)  # the parent and two trials (ASHA may stop one at tick 2)
    assert len(statuses) == 3 and statuses.count("FINISHED") >= 2 and "FAILED" not in statuses, statuses
