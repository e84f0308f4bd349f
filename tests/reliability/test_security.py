"""Safe defaults: a local Ray and `pipeline ui` listen on 127.0.0.1 only; secrets planted in the environment appear
nowhere a run writes; a job's upload leaves out environments, credentials and checkpoints."""

import os
import signal
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import psutil
import pytest

from pipeline.jobs.spec import load_job_spec, runtime_env_dict
from pipeline.tracking.secrets import redact, secret_values

from conftest import TINY_YAML
from servers import clean_env, free_port, wait_for_health

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_a_local_ray_listens_on_loopback_only(ray_session):
    import ray

    @ray.remote
    def touch():
        return os.getpid()

    ray.get([touch.remote() for _ in range(2)])  # start workers too: they listen as well
    ray_processes = psutil.Process().children(recursive=True)
    listening = [(p.name(), c.laddr.ip, c.laddr.port) for p in ray_processes
                 for c in _inet_listeners(p)]
    assert len({name for name, _, _ in listening}) >= 3, listening  # gcs, raylet, workers, agents...
    exposed = [entry for entry in listening if entry[1] not in LOOPBACK]
    assert exposed == [], f"Ray processes listening beyond 127.0.0.1: {exposed}"


def test_pipeline_ui_serves_mlflow_on_loopback_only(tmp_path):
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--port", str(port)], cwd=tmp_path,
                          env=clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", ui, 120)
        tree = [psutil.Process(ui.pid), *psutil.Process(ui.pid).children(recursive=True)]
        listening = {(c.laddr.ip, c.laddr.port) for p in tree for c in _inet_listeners(p)}
        assert (("127.0.0.1", port) in listening) and all(ip in LOOPBACK for ip, _ in listening), listening
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # `pipeline ui` execs mlflow: its PID is the UI's
        ui.wait(timeout=60)


def _inet_listeners(process):
    try:
        return [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_redaction_covers_secret_names_and_url_credentials():
    environ = {"HF_TOKEN": "hf_abcdef123", "WANDB_API_KEY": "k" * 40, "DB_PASSWORD": "pw-123456",
               "AWS_SECRET_ACCESS_KEY": "aws/secret+1", "MLFLOW_TRACKING_USERNAME": "trainer", "HOME": "/root",
               "RAY_DEDUP_LOGS": "0", "MONKEY": "1"}
    assert set(secret_values(environ)) == {"hf_abcdef123", "k" * 40, "pw-123456", "aws/secret+1", "trainer"}
    text = "uri https://trainer:pw-123456@mlflow.example:5000/x token hf_abcdef123 home /root"
    assert redact(text, environ) == "uri https://***@mlflow.example:5000/x token *** home /root"


@pytest.mark.slow
def test_secrets_in_the_environment_appear_nowhere_the_run_writes(tmp_path):
    secrets = {"HF_TOKEN": f"hf_{uuid.uuid4().hex}", "PIPELINE_TEST_API_KEY": f"sk-{uuid.uuid4().hex}",
               "MLFLOW_TRACKING_PASSWORD": uuid.uuid4().hex, "SOME_DB_PASSWORD": uuid.uuid4().hex,
               "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex, "GITHUB_TOKEN": f"ghp_{uuid.uuid4().hex}"}
    ray_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", str(TINY_YAML), "train.max_ticks=2",
         f"model.cache_dir={tmp_path}/models", f"data.cache_dir={tmp_path}/data", f"train.output_dir={tmp_path}/out",
         f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env=clean_env(RAY_TMPDIR=str(ray_dir), **secrets))
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        written = [p for root in (tmp_path, ray_dir) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        assert any(p.name == "config.yaml" for p in written) and any(p.suffix == ".safetensors" for p in written)
        assert any("logs" in p.parts for p in written), "Ray's session logs should be among the files searched"
        found = [(name, where) for name, value in secrets.items()
                 for where, data in [("stdout", result.stdout.encode()), ("stderr", result.stderr.encode())]
                 + [(str(p), _read(p)) for p in written] if value.encode() in data]
        assert found == [], f"secrets leaked: {found}"
    finally:
        subprocess.run(["rm", "-rf", str(ray_dir)], check=False)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # sockets and files Ray removed meanwhile
        return b""


def test_job_uploads_leave_out_environments_credentials_and_checkpoints(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    repo = tmp_path / "repo"
    kept = ["pipeline/cli.py", "configs/tiny.yaml", "jobs/tiny.yaml", "README.md"]
    left_out = [".venv/bin/python", ".ray/auth_token", "sub/.ray/session/auth_token", ".env", "deploy.pem",
                "id.key", ".aws/credentials", ".netrc", ".git-credentials", ".git/config", ".cache/pipeline/x",
                "mlruns/mlflow.db", "outputs/ray/run/checkpoint_2026-01-01_00-00-00.000000/model.pt",
                "elsewhere/checkpoint_2026-01-01_00-00-00.000000/optim.pt"]
    for name in kept + left_out:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    (repo / "jobs" / "tiny.yaml").write_text("entrypoint: pipeline train --config configs/tiny.yaml\n")
    env = runtime_env_dict(load_job_spec(repo / "jobs" / "tiny.yaml"), repo, {})
    package = tmp_path / "package.zip"
    create_package(env["working_dir"], package, include_gitignore=True, excludes=env["excludes"])
    uploaded = {name for name in zipfile.ZipFile(package).namelist() if not name.endswith("/")}
    assert uploaded == set(kept)
