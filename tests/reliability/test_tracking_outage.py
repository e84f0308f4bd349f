"""Tracking failures: an unreachable server fails fast and clearly; a server killed mid-run and
restarted loses nothing and never stops training (a real `mlflow server` on 127.0.0.1, by PID)."""

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline.config import TrackingConfig
from pipeline.tracking.store import client_for
from pipeline.train import run_training

from conftest import TINY_YAML, tiny_config
from servers import MlflowServer, clean_env, free_port


def test_an_unreachable_server_is_a_one_line_error_within_the_timeout(tmp_path):
    assert TrackingConfig().connect_timeout_s == 10.0  # the default
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", str(TINY_YAML), f"model.cache_dir={tmp_path}/m",
         f"tracking.uri=http://127.0.0.1:{free_port()}", "tracking.connect_timeout_s=3"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=clean_env(RAY_TMPDIR=str(ray_dir)))
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: tracking.uri: no MLflow server answered at http://127.0.0.1:")
    assert "within 3 s" in lines[0]
    assert elapsed < 3 + 30  # the timeout plus interpreter start-up, not MLflow's minutes of retries
    assert list(ray_dir.iterdir()) == [], "Ray must not start when tracking is unreachable"


@pytest.mark.slow
def test_a_server_killed_mid_run_and_restarted_gets_every_tick(ray_session, tmp_path, no_tracking_env):
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow").start()
    # Enough ticks that training is still going when the outage starts: the kill waits for tick 3 to
    # reach the server's store, which can lag training by seconds on a loaded machine (80 once left 2).
    ticks = 160
    password = f"pw-{uuid.uuid4().hex}"  # credentials in the URI, as for a server behind basic auth
    uri = server.uri.replace("http://", f"http://trainer:{password}@")
    cfg = tiny_config(tmp_path, f"tracking.uri={uri}", f"train.max_ticks={ticks}", "train.checkpoint_every=80",
                      "train.eval_every=0", "tracking.log_model=false", "tracking.flush_timeout_s=300")
    store = client_for(server.store_uri)  # the server's own database, readable while the server is down
    outage = {}

    def kill_then_restart():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not outage:
            runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
            if runs and max((m.step for m in store.get_metric_history(runs[0].info.run_id, "tick")), default=0) >= 3:
                server.kill()
                outage["down"] = time.time()
                time.sleep(4)  # training goes on meanwhile; its metrics queue up
                server.start()
                outage["up"] = time.time()
            time.sleep(0.05)

    chaos = threading.Thread(target=kill_then_restart, daemon=True)
    chaos.start()
    try:
        outcome = run_training(cfg)
        chaos.join(timeout=180)
        assert "up" in outage, "the server was never killed and restarted"
        run = client_for(server.uri).get_run(outcome.run_id)
        assert run.info.status == "FINISHED"
        history = client_for(server.uri).get_metric_history(outcome.run_id, "tick")
        assert sorted(m.step for m in history) == list(range(ticks + 1)), "every tick arrives exactly once"
        # Ticks that happened while the server was down were buffered and flushed afterwards.
        during = [m.step for m in history if outage["down"] * 1000 < m.timestamp < outage["up"] * 1000]
        print(f"outage of {outage['up'] - outage['down']:.1f} s: ticks {during} happened meanwhile and were flushed")
        assert len(during) >= 3, f"training did not go on during the outage: {during}"
        assert not list((tmp_path / "outputs").glob("unsent-tracking-*.jsonl"))
        # The credentials reached the server but none of what it stores.
        assert run.data.params["tracking.uri"] == f"http://***@127.0.0.1:{server.port}"
        stored = [p for p in (tmp_path / "mlflow").rglob("*") if p.is_file()]
        assert any(p.name == "config.yaml" for p in stored)
        assert not [p for p in stored if password.encode() in p.read_bytes()]
    finally:
        server.stop()


def test_records_the_server_never_took_are_written_to_a_file_not_dropped(tmp_path):
    """A server that never comes back: close() waits its bounded time, then spills every record."""
    from pipeline.tracking import RunTarget
    from pipeline.tracking.buffer import BufferedTracker

    tracker = BufferedTracker(RunTarget(f"http://127.0.0.1:{free_port()}", "run123"), flush_timeout_s=1.0,
                              spill_dir=tmp_path)
    started = time.monotonic()
    for tick in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / tick, "tick": tick}, step=tick)
    tracker.set_tags({"pipeline.restarts": "1"})
    assert time.monotonic() - started < 0.5, "logging must not wait for the server"
    warning = tracker.close()
    spill = tmp_path / "unsent-tracking-run123.jsonl"
    assert warning == (f"warning: the tracking server at http://127.0.0.1:{tracker.target.uri.rsplit(':', 1)[1]} "
                       f"stayed unreachable; 6 unsent records were written to {spill}")
    records = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [r["args"][1] for r in records[:5]] == [1, 2, 3, 4, 5]
    assert records[5] == {"method": "set_tags", "args": [{"pipeline.restarts": "1"}]}
    assert tracker.failures >= 1


def test_a_record_the_server_refuses_is_set_aside_not_retried_forever(tmp_path):
    """A live store that answers 4xx (here: the run was deleted) must not block everything behind it."""
    from pipeline.tracking import RunTarget
    from pipeline.tracking.buffer import BufferedTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    run = client.create_run(client.create_experiment("refusing"))
    client.delete_run(run.info.run_id)
    tracker = BufferedTracker(RunTarget(uri, run.info.run_id), flush_timeout_s=30, spill_dir=tmp_path)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_metrics({"loss": 0.5}, step=2)
    started = time.monotonic()
    warning = tracker.close()
    assert time.monotonic() - started < 10, "refused records must not be retried until the flush timeout"
    assert tracker.rejected == 2 and warning.startswith("warning: the tracking server rejected 2 records")
    records = [json.loads(line) for line in (tmp_path / f"unsent-tracking-{run.info.run_id}.jsonl").read_text().splitlines()]
    assert [r["args"][1] for r in records] == [1, 2]
