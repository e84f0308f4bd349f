"""`pipeline cluster` + `pipeline submit` end to end: a real 2-node Ray cluster and a real MLflow
server, both on 127.0.0.1, started and stopped by PID; every wait is bounded."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.jobs.cluster import is_alive, read_state
from pipeline.tracking.store import client_for

from conftest import REPO
from servers import MlflowServer, clean_env

pytestmark = pytest.mark.slow


def _pipeline(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                          env=env or clean_env(), timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """A local head + worker (pipeline cluster up) and an MLflow tracking server. The nodes carry
    credentials for the S3 server in their environment, as cloud nodes carry an instance role."""
    tmp = tmp_path_factory.mktemp("cluster")
    server = MlflowServer(tmp)
    run_dir = tmp / "cluster"
    try:
        up = _pipeline("cluster", "up", "--run-dir", str(run_dir), env=clean_env(**s3.env()), timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        server.start()
        yield read_state(run_dir), server.uri, tmp
    finally:
        state = read_state(run_dir)
        _pipeline("cluster", "down", "--run-dir", str(run_dir), timeout=200)
        server.stop()
        assert state is None or not any(is_alive(pid) for pid in state.pids), "cluster nodes outlived `down`"


def test_local_cluster_has_two_nodes(cluster):
    state, _, _ = cluster
    status = _pipeline("cluster", "status", "--run-dir", state.run_dir)
    assert "2 nodes alive" in status.stdout, status.stdout + status.stderr


def test_submit_streams_logs_and_the_run_reaches_the_tracking_server(cluster):
    state, uri, tmp = cluster
    done = _pipeline("submit", "jobs/tiny.yaml", "--address", state.address, "train.max_ticks=2",
                     env=clean_env(MLFLOW_TRACKING_URI=uri, PIPELINE_WORK_DIR=str(tmp / "work")))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "[pipeline] tick 2/2" in done.stdout and "SUCCEEDED" in done.stdout  # the job's own log lines
    client = client_for(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert runs and runs[0].info.status == "FINISHED" and runs[0].data.metrics["tick"] == 2
    assert client.get_metric_history(runs[0].info.run_id, "loss")


def test_a_job_whose_nodes_share_only_a_bucket(cluster, tiny_bucket, s3):
    """jobs/tiny-s3.yaml: corpus, caches, checkpoints and the model in the bucket; no PIPELINE_WORK_DIR,
    and each node keeps its node-local copies in a directory of its own."""
    state, uri, _ = cluster
    done = _pipeline("submit", "jobs/tiny-s3.yaml", "--address", state.address, "train.max_ticks=2",
                     "tracking.experiment=tiny-s3", "tracking.log_model=false",
                     env=clean_env(MLFLOW_TRACKING_URI=uri, AWS_ENDPOINT_URL=s3.endpoint))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "[pipeline] tick 2/2" in done.stdout and f"data cache s3://{tiny_bucket}/cache/" in done.stdout
    client = client_for(uri)
    run = client.search_runs([client.get_experiment_by_name("tiny-s3").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.metrics["tick"] == 2
    models = [o["Key"] for o in s3.client().list_objects_v2(Bucket=tiny_bucket, Prefix="outputs/")["Contents"]
              if o["Key"].endswith("/model/config.json")]
    assert any(run.info.run_id[:8] in key for key in models), models
    # Both nodes loaded the model from the bucket into their own directories: nothing was shared.
    copies = {node: list((Path(state.run_dir) / node / "local-cache").glob("*/config.json")) for node in ("head", "worker")}
    assert all(copies.values()), copies


def test_failing_entrypoint_exits_non_zero_with_the_job_error(cluster):
    state, uri, tmp = cluster
    done = _pipeline("submit", "jobs/tiny.yaml", "--address", state.address, "train.lr=fast",
                     env=clean_env(MLFLOW_TRACKING_URI=uri, PIPELINE_WORK_DIR=str(tmp / "work")))
    assert done.returncode == 1
    assert "FAILED" in done.stdout and "config error: train.lr" in done.stdout


def test_wrong_token_is_one_clear_line(cluster):
    state, _, _ = cluster
    done = _pipeline("submit", "jobs/tiny-s3.yaml", "--address", state.address, env=clean_env(RAY_AUTH_TOKEN="not-the-token"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"pipeline: the Ray job API at {state.address} rejected the authentication token")
    assert "Traceback" not in done.stderr


def test_no_wait_prints_the_job_id_and_jobs_commands_follow_it(cluster):
    state, uri, tmp = cluster
    done = _pipeline("submit", "jobs/tiny.yaml", "--no-wait", "--address", state.address, "train.max_ticks=1",
                     env=clean_env(MLFLOW_TRACKING_URI=uri, PIPELINE_WORK_DIR=str(tmp / "work")))
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")
    listed = _pipeline("jobs", "list", env=clean_env(RAY_ADDRESS=state.address))  # the address from RAY_ADDRESS
    assert job_id in listed.stdout
    stopped = _pipeline("jobs", "stop", job_id, "--address", state.address)
    assert stopped.returncode == 0 and job_id in stopped.stdout
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = _pipeline("jobs", "status", job_id, "--address", state.address).stdout
        if "STOPPED" in status or "SUCCEEDED" in status:
            break
        time.sleep(2)
    assert "STOPPED" in status or "SUCCEEDED" in status, status
