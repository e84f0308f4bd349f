"""Ray Tune sweeps: the search space (fast), a real 4-trial sweep with ASHA and MLflow nesting, and a
sweep interrupted with Ctrl-C and resumed (slow, real processes on 127.0.0.1)."""

import os
import signal
import subprocess
import sys
import time

import matplotlib.image
import pytest
import ray

from pipeline.config import ConfigError, load_config
from pipeline.tracking import RunTarget, load_pyfunc
from pipeline.tracking.store import client_for
from pipeline.tracking.sweeps import ROLE_TAG, child_runs
from pipeline.tune import run_sweep
from pipeline.tune.space import ZERO_SHARE, check_space, effective_space, trial_values, tune_space

from conftest import REPO

SWEEP_YAML = REPO / "configs" / "sweep-tiny.yaml"
# The first trial (σ = 0, lr 2e-2) learns fastest; the searcher's other lr value, 1e-4, barely
# moves in 6 ticks, so ASHA has a trial to stop at its first rung.
SPACE = ('sweep.space={"noise.sigma": {"type": "loguniform", "low": 0.001, "high": 0.5, "with_zero": true}, '
         '"train.lr": {"type": "choice", "values": [0.02, 0.0001]}}')


def sweep_overrides(tmp):
    return [f"model.cache_dir={tmp / 'models'}", f"data.cache_dir={tmp / 'data'}",
            f"train.output_dir={tmp / 'outputs'}", f"sweep.storage_dir={tmp / 'sweeps'}",
            f"tracking.uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"]


def test_default_space_has_sigma_zero_first_and_log_ranges(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["sweep.space={}", "train.lr=1e-3"])
    space = effective_space(cfg)
    assert space["noise.sigma"].with_zero and space["noise.sigma"].type == "loguniform"
    assert (space["train.lr"].low, space["train.lr"].high) == pytest.approx((1e-4, 1e-2))
    param_space, points = tune_space(space)
    assert set(param_space) == {"noise.sigma", "noise.sigma@zero", "train.lr"}
    assert trial_values(points[0])["noise.sigma"] == 0.0  # the first trial is the σ = 0 baseline
    assert trial_values({"noise.sigma": 0.1, "noise.sigma@zero": ZERO_SHARE})["noise.sigma"] == 0.1
    check_space(cfg)


def test_bad_sweep_configs_name_the_field():
    with pytest.raises(ConfigError, match=r"sweep.space.data.seq_len: cannot be searched"):
        check_space(load_config(SWEEP_YAML, ['sweep.space={"data.seq_len": {"type": "choice", "values": [8]}}']))
    with pytest.raises(ConfigError, match=r"sweep.space.train.lr: value 0.0 is invalid"):
        check_space(load_config(SWEEP_YAML, ['sweep.space={"train.lr": {"type": "uniform", "low": 0.0, "high": 1}}']))
    with pytest.raises(ConfigError, match=r"sweep.space.noise.sigma: low must be > 0"):
        load_config(SWEEP_YAML, ['sweep.space={"noise.sigma": {"type": "loguniform", "low": 0, "high": 1}}'])
    with pytest.raises(ConfigError, match=r"train.eval_every: a sweep needs evaluations"):
        run_sweep(load_config(SWEEP_YAML, ["train.eval_every=0"]))


# Two "GPUs" declared on the local Ray (Ray schedules declared resources without hardware), one per
# trial's worker: Tune may run as many trials at once as fit, which is two.
FAKE_GPUS = ['ray.resources={"fake_gpu": 2}', 'train.resources_per_worker={"fake_gpu": 1}']


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    # A checkpoint at every evaluation: a trial ASHA stops early has one too (whichever trials it
    # stops, the optimizer-state check below then sees the best trial's and the others').
    cfg = load_config(SWEEP_YAML, sweep_overrides(tmp) + [SPACE, *FAKE_GPUS, "sweep.max_concurrent_trials=0",
                                                          "train.checkpoint_every=2"])
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with pytest.raises(ConfigError, match=r"sweep.max_concurrent_trials: 3 trials at once need \{CPU: 1.53, "
                                              r"fake_gpu: 3\}, and 2 fit .*; set it to at most 2"):
            run_sweep(cfg.with_overrides(["sweep.max_concurrent_trials=3"]))
        outcome = run_sweep(cfg)
    finally:
        ray.shutdown()
    # Logging and registering the model must not leave the store exported to later subprocesses.
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    return cfg, outcome


@pytest.mark.slow
def test_sweep_nests_trials_under_one_parent_and_asha_stops_one(sweep):
    cfg, outcome = sweep
    assert not outcome.interrupted
    uri = cfg.tracking.uri
    client = client_for(uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[ROLE_TAG] == "sweep"
    children = child_runs(RunTarget(uri, outcome.parent_run_id))
    assert len(children) == cfg.sweep.num_samples
    statuses = [run.info.status for run in children]
    assert "RUNNING" not in statuses and "FAILED" not in statuses
    stopped = [run for run in children if run.info.status == "KILLED"]
    assert stopped and all(run.data.tags["pipeline.stopped_by"] == "asha" for run in stopped)
    # Where ASHA stopped them (their workers may finish a tick or two while they are torn down).
    assert all(int(run.data.tags["pipeline.stopped_at_tick"]) < cfg.train.max_ticks for run in stopped)
    assert any(float(run.data.params["noise.sigma"]) == 0.0 for run in children)
    for run in children:  # per-tick metrics in every child, params from the trial's own config
        assert client.get_metric_history(run.info.run_id, "loss")
        assert float(run.data.params["train.lr"]) in (0.02, 0.0001)
    assert "best_eval_loss" in parent.data.metrics and "noise_gain" in parent.data.metrics
    # The trials ran two at a time: as many as the fake GPUs fit, and never more. A trial's span is
    # its run's start to its last logged tick (the best run's end time moves when its model is logged).
    spans = [(run.info.start_time, max(m.timestamp for m in client.get_metric_history(run.info.run_id, "loss")))
             for run in children]
    at_once = max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)
    assert at_once == 2, spans
    assert float(parent.data.params["best.train.lr"]) == 0.02


@pytest.mark.slow
def test_only_the_best_trials_checkpoint_keeps_its_optimizer_state(sweep):
    from pipeline.train.checkpoints import problem_with, weights_only

    cfg, outcome = sweep
    best = client_for(cfg.tracking.uri).get_run(outcome.parent_run_id).data.params["best.trial_id"]
    checkpoints = sorted(p for p in outcome.experiment_dir.parent.glob(f"{outcome.experiment_dir.name}-trials/trial-*/"
                                                                          "checkpoint_*") if p.is_dir())
    assert any(f"trial-{best}" in str(c) for c in checkpoints) and len(checkpoints) > 1
    for checkpoint in checkpoints:
        mine = f"trial-{best}" in str(checkpoint)
        assert bool(list(checkpoint.glob("*/*optim_states.pt"))) == mine, checkpoint
        assert weights_only(checkpoint) != mine and problem_with(checkpoint) is None  # still a verified checkpoint
        assert (checkpoint / next(checkpoint.glob("tick-*")).name / "mp_rank_00_model_states.pt").is_file()


@pytest.mark.slow
def test_sweep_report_csv_plots_and_registered_model(sweep):
    cfg, outcome = sweep
    uri = cfg.tracking.uri
    artifacts = {a.path for a in client_for(uri).list_artifacts(outcome.parent_run_id)}
    assert {"trials.csv", "eval_loss_vs_sigma.png", "eval_loss_vs_lr.png", "learning_curves.png",
            "verdict.txt"} <= artifacts
    report = outcome.experiment_dir / "report"
    rows = (report / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial_id,run_id,status") and len(rows) == 1 + cfg.sweep.num_samples
    for png in ("eval_loss_vs_sigma.png", "eval_loss_vs_lr.png", "learning_curves.png"):
        image = matplotlib.image.imread(report / png)
        assert image.ndim == 3 and image.shape[0] > 100
    assert outcome.registered == "models:/tiny-sweep-best/1"
    version = client_for(uri).get_model_version("tiny-sweep-best", "1")
    assert version.tags["sweep_id"] == outcome.parent_run_id and float(version.tags["train.lr"]) == 0.02
    generator = load_pyfunc(outcome.registered, uri)
    text = generator.predict(["Fellow-Citizens of the Senate"])
    assert isinstance(text[0], str) and len(text[0]) > 0


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_completes(tmp_path):
    overrides = sweep_overrides(tmp_path) + ["sweep.num_samples=2", "sweep.max_concurrent_trials=1",
                                             "sweep.name=interrupted", "tracking.log_model=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # the store is the one in the overrides
    command = [sys.executable, "-m", "pipeline", "tune", "--config", str(SWEEP_YAML), *overrides]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and first.poll() is None:  # until the first trial has ended
            if _ended_trials(uri) >= 1:
                break
            time.sleep(3)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert _ended_trials(uri) >= 1, "the first trial did not end in time"
        first.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert first.wait(timeout=180) == 130
    finally:
        if first.poll() is None:
            first.kill()
    experiment_dir = tmp_path / "sweeps" / "interrupted"
    assert "pipeline tune --resume" in (tmp_path / "first.log").read_text()
    client = client_for(uri)
    parent_id = client.search_runs([client.get_experiment_by_name("tiny-sweep").experiment_id],
                                   filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")[0].info.run_id
    assert client.get_run(parent_id).info.status == "KILLED"
    assert all(run.info.status != "RUNNING" for run in child_runs(RunTarget(uri, parent_id)))

    resumed = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--resume", str(experiment_dir)],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    children = child_runs(RunTarget(uri, parent_id))
    trial_ids = {run.data.tags["pipeline.trial_id"] for run in children}
    assert len(trial_ids) == 2 and len(children) == 2
    assert all(run.info.status in ("FINISHED", "KILLED") for run in children)
    assert client.get_run(parent_id).info.status == "FINISHED"


def _ended_trials(uri: str) -> int:
    client = client_for(uri)
    experiment = client.get_experiment_by_name("tiny-sweep")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    return sum(run.info.status in ("FINISHED", "KILLED") for run in runs)


@pytest.mark.slow
def test_runs_sweep_lists_the_trials_best_first(sweep, monkeypatch, capsys):
    from pipeline.cli import main

    cfg, outcome = sweep
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.uri)
    assert main(["runs", "--sweep", outcome.parent_run_id[:8]]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[3:] if line.strip()]
    assert len(rows) == cfg.sweep.num_samples
    losses = [float(row[-1]) for row in rows]
    assert losses == sorted(losses)
    assert main(["runs", "--sweep", "zzzz"]) == 2  # an unknown sweep is a one-line error
