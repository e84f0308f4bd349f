"""Ray Tune sweeps: the search space (fast), a real 4-trial sweep with ASHA and MLflow nesting, and a
sweep interrupted with Ctrl-C and resumed (slow, real processes on 127.0.0.1)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import ray

from pipeline.config import ConfigError, load_config
from pipeline.tracking import RunTarget, load_pyfunc
from pipeline.tracking.store import client_for
from pipeline.tracking.sweeps import ARM_TAG, PHASE_TAG, ROLE_TAG, SEED_TAG, TRIAL_TAG, child_runs
from pipeline.tune import run_sweep
from pipeline.tune.arms import plan_confirmation
from pipeline.tune.goal import LOSS
from pipeline.tune.paired import COMPARISONS, pair_up, plot_pairs
from pipeline.tune.space import ZERO_SHARE, check_space, effective_space, trial_values, tune_space

from conftest import REPO
from servers import MlflowServer, tags
from test_console import library_lines

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
    embedding = load_config(REPO / "configs" / "tiny.yaml", ["sweep.space={}", "noise.site=embedding"])
    assert set(effective_space(embedding)) == {"noise.neftune_alpha", "train.lr"}
    check_space(embedding)


def test_bad_sweep_configs_name_the_field():
    with pytest.raises(ConfigError, match=r"sweep.space.data.seq_len: cannot be searched"):
        check_space(load_config(SWEEP_YAML, ['sweep.space={"data.seq_len": {"type": "choice", "values": [8]}}']))
    with pytest.raises(ConfigError, match=r"sweep.space.train.lr: value 0.0 is invalid"):
        check_space(load_config(SWEEP_YAML, ['sweep.space={"train.lr": {"type": "uniform", "low": 0.0, "high": 1}}']))
    with pytest.raises(ConfigError, match=r"sweep.space.noise.sigma: low must be > 0"):
        load_config(SWEEP_YAML, ['sweep.space={"noise.sigma": {"type": "loguniform", "low": 0, "high": 1}}'])
    with pytest.raises(ConfigError, match=r"train.eval_every: a sweep needs evaluations"):
        run_sweep(load_config(SWEEP_YAML, ["train.eval_every=0"]))


def test_paired_interval_and_the_three_verdicts(tmp_path):
    from scipy import stats

    noise = next(c for c in COMPARISONS if c.name == "noise")
    zero = (3.00, 3.20, 3.10, 3.30)
    cases = {"helped": (2.90, 3.12, 2.98, 3.21), "hurt": (3.08, 3.31, 3.17, 3.42), "none": (2.95, 3.26, 3.04, 3.33)}
    for outcome, noisy in cases.items():
        paired = pair_up(noise, {**{("zero", k + 1): v for k, v in enumerate(zero)},
                                 **{("noisy", k + 1): v for k, v in enumerate(noisy)}}, LOSS)
        diffs = [z - n for z, n in zip(zero, noisy)]  # σ = 0 twin minus noisy: positive = noise helped
        low, high = stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / len(diffs), scale=stats.sem(diffs))
        assert (paired.low, paired.high) == pytest.approx((low, high), abs=1e-12)
        assert paired.outcome == outcome and (low > 0, high < 0) == (outcome == "helped", outcome == "hurt")
        sentence = paired.sentence()
        start = {"helped": "noise helped by ", "hurt": "noise hurt by ", "none": "no detectable difference"}[outcome]
        assert sentence.startswith(start), sentence
        if outcome != "none":
            assert f"{abs(paired.mean):.4f} ± {paired.half_width:.4f}" in sentence
        metrics = paired.metrics()
        assert metrics["confirm_noise_diff"] == pytest.approx(sum(diffs) / 4) and metrics["confirm_noise_pairs"] == 4
    image = matplotlib.image.imread(plot_pairs(paired, tmp_path / "pairs.png"))
    assert image.ndim == 3 and image.shape[0] > 100
    # A seed whose twin failed drops out of the pairs; one pair left gives no interval.
    assert pair_up(noise, {("zero", 1): 3.0, ("noisy", 1): 2.9, ("zero", 2): math.nan, ("noisy", 2): 3.0}, LOSS) is None


def test_confirmation_plan_pairs_the_best_noisy_trial_with_its_zero_twin():
    cfg = load_config(SWEEP_YAML, ["sweep.confirm.seeds=3", "train.seed=5"])
    ranked = [("t0", 2.5, {"noise.sigma": 0.1, "noise.sigma@zero": 0.0, "train.lr": 0.02}),  # gated to σ = 0
              ("t1", 2.6, {"noise.sigma": 0.04, "noise.sigma@zero": 0.9, "train.lr": 0.01}),
              ("t2", math.nan, {"noise.sigma": 0.3, "noise.sigma@zero": 0.9, "train.lr": 0.03})]
    plan = plan_confirmation(cfg, ranked)
    assert plan.source == "trial t1" and list(plan.arms) == ["noisy", "zero"] and plan.seeds == (1, 2, 3)
    runs = {(arm, k): cfg.with_overrides(plan.overrides(arm, k)) for arm in plan.arms for k in plan.seeds}
    assert {(r.noise.sigma, r.train.lr) for (arm, _), r in runs.items() if arm == "noisy"} == {(0.04, 0.01)}
    assert {(r.noise.sigma, r.train.lr) for (arm, _), r in runs.items() if arm == "zero"} == {(0.0, 0.01)}
    for k in plan.seeds:  # a pair shares its seeds; each seed is new
        assert runs["noisy", k].train.seed == runs["zero", k].train.seed == 5 + k
        assert runs["noisy", k].noise.seed == runs["zero", k].noise.seed == k
    assert plan_confirmation(cfg, ranked[:1]) is None  # only σ = 0 finished: nothing to confirm
    assert plan_confirmation(cfg.with_overrides(["noise.sigma=0.2"]), None).arms["noisy"] == ()  # as given
    with pytest.raises(ConfigError, match=r"sweep.confirm.only: the config has no noise"):
        run_sweep(load_config(SWEEP_YAML, ["sweep.confirm.only=true"]))
    with pytest.raises(ConfigError, match=r"sweep.confirm.seeds: 1 seed gives one pair and no interval"):
        load_config(SWEEP_YAML, ["sweep.confirm.seeds=1"])


def test_a_search_with_neftune_gets_a_neftune_twin_at_the_best_neftune_alpha():
    space = ('sweep.space={"noise.sigma": {"type": "loguniform", "low": 0.01, "high": 0.3, "with_zero": true}, '
             '"noise.neftune_alpha": {"type": "loguniform", "low": 1, "high": 15, "with_zero": true}}')
    cfg = load_config(SWEEP_YAML, [space, "noise.site=both", "sweep.confirm.seeds=2"])
    ranked = [("t0", 2.4, {"noise.sigma": 0.1, "noise.sigma@zero": 0.9, "noise.neftune_alpha": 3.0,
                           "noise.neftune_alpha@zero": 0.0}),  # norm noise alone (α gated to 0) won
              ("t1", 2.5, {"noise.sigma": 0.2, "noise.sigma@zero": 0.0, "noise.neftune_alpha": 7.0,
                           "noise.neftune_alpha@zero": 0.9})]  # NEFTune alone: the best α among those on
    plan = plan_confirmation(cfg, ranked)
    assert plan.source == "trial t0" and list(plan.arms) == ["noisy", "zero", "neftune"]
    noisy, zero, neftune = (cfg.with_overrides(plan.overrides(arm, 1)) for arm in plan.arms)
    assert (noisy.noise.sigma, noisy.noise.embedding_alpha) == (0.1, 0.0)
    assert (zero.noise.sigma, zero.noise.embedding_alpha) == (0.0, 0.0)
    assert (neftune.noise.sigma, neftune.noise.site, neftune.noise.embedding_alpha) == (0.0, "embedding", 7.0)
    assert noisy.train.seed == zero.train.seed == neftune.train.seed == 1
    only_neftune = plan_confirmation(cfg, ranked[1:])  # the best noisy trial is NEFTune alone: no twin of itself
    assert list(only_neftune.arms) == ["noisy", "zero"] and "NEFTune alone" in only_neftune.note


# Two "GPUs" declared on the local Ray (Ray schedules declared resources without hardware), one per
# trial's worker: Tune may run as many trials at once as fit, which is two.
FAKE_GPUS = ['ray.resources={"fake_gpu": 2}', 'train.resources_per_worker={"fake_gpu": 1}']


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """In one Ray session: the 4-trial sweep with a 2-seed confirmation, and that sweep resumed after
    it finished. (A confirm.only sweep is left out: its 4 runs cost about a minute, mostly start-up;
    its plan is checked without Ray above.)"""
    tmp = tmp_path_factory.mktemp("sweep")
    # A checkpoint at every evaluation: a trial ASHA stops early has one too (whichever trials it
    # stops, the optimizer-state check below then sees the best trial's and the others').
    cfg = load_config(SWEEP_YAML, sweep_overrides(tmp) + [SPACE, *FAKE_GPUS, "sweep.max_concurrent_trials=0",
                                                          "train.checkpoint_every=2", "sweep.confirm.seeds=2"])
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with pytest.raises(ConfigError, match=r"sweep.max_concurrent_trials: 3 trials at once need \{CPU: 1.53, "
                                              r"fake_gpu: 3\}, and 2 fit .*; set it to at most 2"):
            run_sweep(cfg.with_overrides(["sweep.max_concurrent_trials=3"]))
        started = time.monotonic()
        outcome = run_sweep(cfg)
        print(f"[sweep fixture] search + confirmation: {time.monotonic() - started:.0f} s")
        resumed = run_sweep(resume=outcome.experiment)  # nothing left to run: its finished runs are kept
        print(f"[sweep fixture] with the resume: {time.monotonic() - started:.0f} s")
    finally:
        ray.shutdown()
    # Logging and registering the model must not leave the store exported to later subprocesses.
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    return {"search": (cfg, outcome), "resumed": resumed}


@pytest.fixture(scope="module")
def sweep(sweeps):
    return sweeps["search"]


def _phase(runs, phase):
    return [run for run in runs if run.data.tags[PHASE_TAG] == phase]


def _final_eval_loss(client, run) -> float:
    """The eval loss a run logged at its last evaluation (its last tick)."""
    return max(client.get_metric_history(run.info.run_id, "eval_loss"), key=lambda m: m.step).value


@pytest.mark.slow
def test_sweep_nests_trials_under_one_parent_and_asha_stops_one(sweep):
    cfg, outcome = sweep
    assert not outcome.interrupted
    uri = cfg.tracking.uri
    client = client_for(uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[ROLE_TAG] == "sweep"
    children = _phase(child_runs(RunTarget(uri, outcome.parent_run_id)), "search")
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
        # One CPU rank: trained in the trial's own process, no Train worker group started for it.
        assert "startup.model_s" in run.data.metrics and "startup.worker_group_s" not in run.data.metrics
    assert "best_eval_loss" in parent.data.metrics
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
            "verdict.txt", "confirm.csv", "confirm_noise.png"} <= artifacts
    report = outcome.experiment_dir / "report"
    rows = (report / "trials.csv").read_text().splitlines()  # the search's trials only
    assert rows[0].startswith("trial_id,run_id,status") and len(rows) == 1 + cfg.sweep.num_samples
    rows = (report / "confirm.csv").read_text().splitlines()
    assert rows[0].startswith("arm,seed,train_seed,noise_seed,trial_id") and len(rows) == 1 + 4
    for png in ("eval_loss_vs_sigma.png", "eval_loss_vs_lr.png", "learning_curves.png", "confirm_noise.png"):
        image = matplotlib.image.imread(report / png)
        assert image.ndim == 3 and image.shape[0] > 100
    assert outcome.registered == "models:/tiny-sweep-best/1"
    version = client_for(uri).get_model_version("tiny-sweep-best", "1")
    assert version.tags["sweep_id"] == outcome.parent_run_id and float(version.tags["train.lr"]) == 0.02
    assert version.tags["phase"] == "search"  # the best search trial's model, as before confirmation existed
    generator = load_pyfunc(outcome.registered, uri)
    text = generator.predict(["Fellow-Citizens of the Senate"])
    assert isinstance(text[0], str) and len(text[0]) > 0


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_completes(tmp_path):
    # Two workers per trial: these trials run a TorchTrainer (the fixture's one-rank trials train in
    # their own process), so the Train path of a trial, its restore included, is covered here.
    overrides = sweep_overrides(tmp_path) + ["train.num_workers=2", "sweep.num_samples=2", "sweep.max_concurrent_trials=1",
                                             "sweep.name=interrupted", "tracking.log_model=false",
                                             "sweep.confirm.seeds=0"]  # the search's resume; the fixture resumes a confirmation
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

    _wait_for_ray_to_stop()  # the interrupted process's Ray: a new one beside it can time out starting
    resumed = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--resume", str(experiment_dir)],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # The console shows the sweep's progress (both trials, the first one's from before the interrupt)
    # and none of Ray Tune's tables or the trials' library lines.
    assert re.search(r"^\[pipeline\] trial 2/2 \| 0 running \| .*best eval loss [\d.]+ \(trial \w+\) \| done$",
                     resumed.stdout, re.M), resumed.stdout[-3000:]
    assert library_lines(resumed.stdout + resumed.stderr) == []
    children = child_runs(RunTarget(uri, parent_id))
    trial_ids = {run.data.tags["pipeline.trial_id"] for run in children}
    assert len(trial_ids) == 2 and len(children) == 2
    assert all(run.info.status in ("FINISHED", "KILLED") for run in children)
    assert client.get_run(parent_id).info.status == "FINISHED"


@pytest.mark.slow
def test_confirmation_pairs_the_best_noisy_trial_with_sigma_zero_twins_on_new_seeds(sweep):
    from scipy import stats

    cfg, outcome = sweep
    client = client_for(cfg.tracking.uri)
    parent = client.get_run(outcome.parent_run_id)
    children = child_runs(RunTarget(cfg.tracking.uri, outcome.parent_run_id))
    search, confirm = _phase(children, "search"), _phase(children, "confirm")
    assert len(search) == cfg.sweep.num_samples and len(confirm) == 2 * 2  # 2 seeds x (noisy, σ = 0 twin)
    runs = {(run.data.tags[ARM_TAG], int(run.data.tags[SEED_TAG])): run for run in confirm}
    assert set(runs) == {("noisy", 1), ("noisy", 2), ("zero", 1), ("zero", 2)}
    assert all(run.info.status == "FINISHED" and run.data.metrics["tick"] == cfg.train.max_ticks for run in confirm)
    # The confirmed config is the best search trial with σ > 0 (no ASHA in confirmation: every run
    # trains to the end, so a pair compares like with like).
    noisy_search = [run for run in search if float(run.data.params["noise.sigma"]) > 0]
    confirmed = min(noisy_search, key=lambda run: _final_eval_loss(client, run))
    assert parent.data.params["confirm.source"] == f"trial {confirmed.data.tags[TRIAL_TAG]}"
    for (arm, k), run in runs.items():
        params = run.data.params
        assert params["train.lr"] == confirmed.data.params["train.lr"]
        assert float(params["noise.sigma"]) == (float(confirmed.data.params["noise.sigma"]) if arm == "noisy" else 0.0)
        assert (params["train.seed"], params["noise.seed"]) == (str(k), str(k))  # new seeds; the search ran at 0
    assert {run.data.params["train.seed"] for run in search} == {"0"}
    # The interval, recomputed from the child runs' final eval losses: σ = 0 twin minus noisy.
    diffs = [_final_eval_loss(client, runs["zero", k]) - _final_eval_loss(client, runs["noisy", k]) for k in (1, 2)]
    mean = sum(diffs) / 2
    half = stats.t.ppf(0.975, 1) * stats.tstd(diffs) / math.sqrt(2)
    metrics = parent.data.metrics
    assert metrics["confirm_noise_diff"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
    assert (metrics["confirm_noise_ci_low"], metrics["confirm_noise_ci_high"]) == pytest.approx(
        (mean - half, mean + half), rel=1e-9, abs=1e-12)
    assert metrics["confirm_noise_pairs"] == 2 and "noise_gain" not in metrics  # the confounded figure is gone
    expected = "noise helped by" if mean - half > 0 else "noise hurt by" if mean + half < 0 else "no detectable difference"
    verdict = client.download_artifacts(outcome.parent_run_id, "verdict.txt")
    assert expected in outcome.verdict and outcome.verdict in open(verdict).read()
    assert f"{abs(mean):.4f} ± {half:.4f}" in outcome.verdict or expected == "no detectable difference"


@pytest.mark.slow
def test_a_finished_sweep_resumed_repeats_no_run_and_keeps_its_model(sweeps):
    cfg, outcome = sweeps["search"]
    resumed = sweeps["resumed"]
    children = child_runs(RunTarget(cfg.tracking.uri, outcome.parent_run_id))
    assert len(children) == cfg.sweep.num_samples + 4  # the search's and the confirmation's Tune runs restored
    assert not resumed.interrupted and resumed.verdict == outcome.verdict
    assert resumed.registered == outcome.registered == "models:/tiny-sweep-best/1"  # not registered again
    assert client_for(cfg.tracking.uri).get_run(outcome.parent_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_the_ui_files_the_sweep_and_its_trials_as_training_runs(sweeps):
    """The sweep's store through a tracking server, read as the UI reads it (test_mlflow_ui.py has
    the `pipeline train` side): parent and trials carry model outputs (not "Evaluation runs"),
    the packed dataset, and `pipeline tune` as their source; each trial's model names its checkpoints."""
    cfg, outcome = sweeps["search"]
    server = MlflowServer(Path(cfg.tracking.uri.removeprefix("sqlite:///")).parent).start()
    try:
        experiment, runs, models = server.ui_records(cfg.tracking.experiment)
    finally:
        server.stop()
    assert tags(experiment)["mlflow.experimentKind"] == "custom_model_development"
    [parent] = [run for run in runs if run["info"]["run_id"] == outcome.parent_run_id]
    children = [run for run in runs if tags(run["data"]).get("mlflow.parentRunId") == outcome.parent_run_id]
    assert len(children) == cfg.sweep.num_samples + 4
    model_of = {model["info"]["source_run_id"]: model["info"] for model in models}
    for run in [parent, *children]:
        assert tags(run["data"])["mlflow.source.name"] == "pipeline tune"
        [dataset] = [d["dataset"] for d in run["inputs"]["dataset_inputs"]]
        location = Path(json.loads(dataset["source"])["uri"])
        assert dataset["digest"] == location.name and location.parent == Path(cfg.data.cache_dir)
    trial_models = set()
    for child in children:
        model = model_of[child["info"]["run_id"]]
        assert child["outputs"]["model_outputs"] == [{"model_id": model["model_id"], "step": 0}]
        # Every trial here ran to its end or was stopped by ASHA: it trained, its checkpoints stay.
        assert model["status"] == "LOGGED_MODEL_READY"
        trial = tags(child["data"])[TRIAL_TAG]
        assert tags(model)["pipeline.checkpoints"].endswith(f"-trials/trial-{trial}")
        trial_models.add(model["model_id"])
    assert {output["model_id"] for output in parent["outputs"]["model_outputs"]} == trial_models
    # The registered model is the best trial's declared one, filled in by mlflow.transformers.
    source = client_for(cfg.tracking.uri).get_model_version("tiny-sweep-best", "1").source
    best = client_for(cfg.tracking.uri).get_run(outcome.parent_run_id).data.params["best.trial_id"]
    [best_run] = [child for child in children if tags(child["data"])[TRIAL_TAG] == best]
    assert source == f"models:/{model_of[best_run['info']['run_id']]['model_id']}"


def _wait_for_ray_to_stop(timeout_s: float = 60) -> None:
    """Until no Ray GCS server runs on this machine (this test's process runs none), at most `timeout_s`."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.info["name"] == "gcs_server" for p in psutil.process_iter(["name"])):
        time.sleep(1)


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
    search, _, confirmation = capsys.readouterr().out.partition("confirmation runs (paired by seed)")
    rows = [line.split() for line in search.splitlines()[3:] if line.strip()]
    assert len(rows) == cfg.sweep.num_samples  # the confirmation runs are not candidates
    losses = [float(row[-1]) for row in rows]
    assert losses == sorted(losses)
    rows = [line.split() for line in confirmation.splitlines()[3:] if line.strip()]
    assert sorted((row[0], int(row[1])) for row in rows) == [("noisy", 1), ("noisy", 2), ("zero", 1), ("zero", 2)]
    assert main(["runs", "--sweep", "zzzz"]) == 2  # an unknown sweep is a one-line error
