"""TickLog on a real sqlite MLflow store: after a restart, every tick once, in order, nothing lost."""

import time

from pipeline.tracking import RunTarget, Tracker
from pipeline.tracking.store import client_for
from pipeline.train.tick_log import TickLog


def new_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    run = client.create_run(client.create_experiment("ticks"))
    return Tracker(RunTarget(uri, run.info.run_id)), client, run.info.run_id


def steps(client, run_id, key="tick"):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]


def test_a_restart_resends_what_was_buffered_and_skips_what_was_logged(tmp_path):
    tracker, client, run_id = new_run(tmp_path)
    for tick in range(0, 4):  # the first attempt got ticks 0-3 to the server, then died at tick 7
        tracker.log_metrics({"tick": tick, "loss": 10.0 - tick}, step=tick)
    # Its tick-5 checkpoint carried ticks 4 and 5, still buffered then; tick 2 is carried by mistake too.
    now = int(time.time() * 1000)  # when those ticks happened, after ticks 0-3 were logged
    carried = [({"tick": 2, "loss": 8.0}, 2, now), ({"tick": 4, "loss": 6.0}, 4, now + 1),
               ({"tick": 5, "loss": 5.0}, 5, now + 2)]
    printed = []
    log = TickLog(tracker, resumed_tick=5, say=printed.append, carried=carried)
    for tick in range(6, 9):
        log.log({"tick": tick, "loss": 10.0 - tick}, tick)
    assert steps(client, run_id) == list(range(0, 9))
    tags = client.get_run(run_id).data.tags
    assert tags["pipeline.restarts"] == "1"
    assert tags["pipeline.restart.1"] == ("restart 1: resumed at tick 5; no tick to redo; sent ticks 4-5, "
                                          "which were still buffered when the worker died")
    assert printed == ["[pipeline] " + tags["pipeline.restart.1"]]


def test_redone_ticks_are_compared_not_logged_again(tmp_path):
    tracker, client, run_id = new_run(tmp_path)
    for tick in range(0, 8):
        tracker.log_metrics({"tick": tick, "loss": 10.0 - tick}, step=tick)
    log = TickLog(tracker, resumed_tick=5, say=lambda text: None)
    log.log({"tick": 6, "loss": 4.0}, 6)
    log.log({"tick": 7, "loss": 3.0 * (1 + 2e-6)}, 7)  # reproduced to 2e-6
    log.log({"tick": 8, "loss": 2.0}, 8)
    assert steps(client, run_id) == list(range(0, 9))
    tags = client.get_run(run_id).data.tags
    assert tags["pipeline.restart.1"].startswith("restart 1: resumed at tick 5; redoing ticks 6-7")
    assert float(tags["pipeline.restart.1.max_rel_loss_diff"]) == 2e-6


def test_a_fresh_run_logs_everything_and_ignores_a_foreign_checkpoints_backlog(tmp_path):
    tracker, client, run_id = new_run(tmp_path)
    log = TickLog(tracker, resumed_tick=4, say=lambda text: None)  # resumed from another run: no carry
    for tick in range(5, 7):
        log.log({"tick": tick, "loss": 1.0}, tick)
    assert steps(client, run_id) == [5, 6] and "pipeline.restarts" not in client.get_run(run_id).data.tags
