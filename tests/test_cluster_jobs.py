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
from servers import MlflowServer, clean_env, free_port

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


# One RAY_ADDRESS for every command (issue 17, item 4): the job API form and the GCS form, each for a
# command that joins the cluster with ray.init (`prepare`, the cheapest) and for `jobs`.

def _prepare(tmp: Path, name: str, ray_address: str) -> subprocess.CompletedProcess:
    """`pipeline prepare` on a cache of its own, so that it misses and starts Ray."""
    return _pipeline("prepare", "--config", "configs/tiny.yaml", f"data.cache_dir={tmp / name}",
                     env=clean_env(RAY_ADDRESS=ray_address), timeout=300)


def _drivers(state, marker: str) -> list[str]:
    """The cluster's job list lines (drivers that joined it included) whose entrypoint names `marker`."""
    listed = _pipeline("jobs", "list", "--address", state.address)
    assert listed.returncode == 0, listed.stderr
    return [line for line in listed.stdout.splitlines() if marker in line]


def test_prepare_with_the_job_api_in_RAY_ADDRESS_joins_the_cluster(cluster):
    state, _, tmp = cluster
    done = _prepare(tmp, "cache-job-api", state.address)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "data cache" in done.stdout and "Traceback" not in done.stderr
    assert f"(the GCS of the job API {state.address})" in done.stdout  # one of our lines, on the console
    # It ran as a driver of this cluster, not in a local Ray of its own.
    assert _drivers(state, str(tmp / "cache-job-api")), "prepare's driver is not in the cluster's job list"


def test_the_gcs_address_in_RAY_ADDRESS_serves_prepare_and_jobs(cluster):
    state, _, tmp = cluster
    gcs = f"127.0.0.1:{state.gcs_port}"
    done = _prepare(tmp, "cache-gcs", gcs)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"[pipeline] joined the Ray cluster at {gcs}" in done.stdout
    listed = _pipeline("jobs", "list", env=clean_env(RAY_ADDRESS=gcs))  # the job API read from the GCS
    assert listed.returncode == 0, listed.stderr
    assert str(tmp / "cache-gcs") in listed.stdout
    # HOST:PORT of the job API without the scheme still means the job API.
    bare = _pipeline("jobs", "list", "--address", state.address.removeprefix("http://"))
    assert bare.returncode == 0 and str(tmp / "cache-gcs") in bare.stdout, bare.stderr


def test_a_job_api_without_a_reachable_gcs_stops_prepare_in_one_line(cluster):
    """The tracking server is a real HTTP server that is no Ray job API: no GCS is found through it,
    as none is from a laptop that reaches only a forwarded dashboard port."""
    _, uri, tmp = cluster
    done = _prepare(tmp, "cache-no-gcs", uri)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stderr.strip().splitlines() == [
        f"pipeline: RAY_ADDRESS={uri} is a job API and its cluster cannot be joined from here ({uri} does not "
        f"answer as a Ray job API): submit the command as a job (pipeline submit jobs/<spec>.yaml) or set "
        f"RAY_ADDRESS / ray.address to the GCS address (HOST:6379)"]


def test_a_gcs_address_where_nothing_answers_is_one_line():
    dead = f"127.0.0.1:{free_port()}"
    listed = _pipeline("jobs", "list", env=clean_env(RAY_ADDRESS=dead))
    assert listed.returncode == 1
    assert listed.stderr.strip().splitlines() == [
        f"pipeline: nothing answers at {dead}: is the cluster up and the address right (its job API "
        f"http://HOST:8265 or its GCS HOST:6379)?"]
