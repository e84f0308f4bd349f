"""The sweep's metric (`sweep.metric`, `sweep.mode`): its direction, the order of the trials, the
sign of the confirmation's paired difference, and `pipeline runs --sweep` on a real MLflow store
(runs logged as a sweep logs them, without Ray)."""

import csv
import math

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.tracking import RunTarget, start_run
from pipeline.tracking.sweeps import ARM_TAG, SEED_TAG, start_trial_run
from pipeline.tune.arms import plan_confirmation
from pipeline.tune.confirm import confirm_report
from pipeline.tune.goal import LOSS, Goal
from pipeline.tune.paired import COMPARISONS, pair_up
from pipeline.tune.summary import collect_trials, sweep_goal
from pipeline.tune.sweep import check_sweep

from conftest import REPO

SWEEP_YAML = REPO / "configs" / "sweep-tiny.yaml"
CLASSIFY = ["model.task=sequence_classification", "data.format=labelled_text"]
NOISE = next(c for c in COMPARISONS if c.name == "noise")


def test_the_mode_follows_the_metric_unless_given():
    assert load_config(SWEEP_YAML).sweep.metric_mode == "min"  # the default: eval_loss
    for metric, mode in (("eval_accuracy", "max"), ("eval_f1", "max"), ("eval_perplexity", "min"),
                         ("eval_recall", "max"), ("loss", "min")):
        assert load_config(SWEEP_YAML, [f"sweep.metric={metric}"]).sweep.metric_mode == mode
    with pytest.raises(ConfigError, match=r"sweep.mode: say whether a smaller \(min\) or larger \(max\) 'eval_bleu'"):
        load_config(SWEEP_YAML, ["sweep.metric=eval_bleu"])
    assert load_config(SWEEP_YAML, ["sweep.metric=eval_bleu", "sweep.mode=max"]).sweep.metric_mode == "max"
    assert load_config(SWEEP_YAML, ["sweep.metric=eval_accuracy", "sweep.mode=min"]).sweep.metric_mode == "min"


def test_a_metric_the_task_does_not_report_is_refused_before_the_sweep():
    with pytest.raises(ConfigError, match=r"sweep.metric: model.task 'causal_lm' does not report 'eval_accuracy'; "
                                          r"its evaluation reports eval_loss, eval_perplexity"):
        check_sweep(load_config(SWEEP_YAML, ["sweep.metric=eval_accuracy"]))
    check_sweep(load_config(SWEEP_YAML, [*CLASSIFY, "sweep.metric=eval_accuracy"]))
    check_sweep(load_config(SWEEP_YAML, [*CLASSIFY, "sweep.metric=eval_f1"]))
    with pytest.raises(ConfigError, match=r"does not report 'eval_precision'"):  # token classification's only
        check_sweep(load_config(SWEEP_YAML, [*CLASSIFY, "sweep.metric=eval_precision"]))
    with pytest.raises(ConfigError, match=r"does not report 'eval_f1'"):  # confirmation alone compares it too
        check_sweep(load_config(SWEEP_YAML, ["sweep.metric=eval_f1", "sweep.confirm.only=true", "noise.sigma=0.1"]))


def test_best_first_and_the_gain_sign_for_either_mode():
    accuracy = Goal("eval_accuracy", "max")
    values = [0.61, math.nan, 0.74, 0.52]
    assert sorted(values, key=accuracy.rank_key)[:3] == [0.74, 0.61, 0.52]
    assert math.isnan(sorted(values, key=accuracy.rank_key)[-1])  # no evaluation: last either way
    assert sorted(values, key=LOSS.rank_key)[:3] == [0.52, 0.61, 0.74]
    assert accuracy.best(values) == 0.74 and LOSS.best(values) == 0.52 and math.isnan(LOSS.best([math.nan]))
    assert accuracy.better(0.7, than=0.6) and LOSS.better(0.6, than=0.7)
    # Positive: the treatment did better, whichever way "better" points.
    assert accuracy.gain(baseline=0.60, treatment=0.65) == pytest.approx(0.05)
    assert LOSS.gain(baseline=3.0, treatment=2.9) == pytest.approx(0.1)
    assert accuracy.difference_words("zero", "noisy") == "noisy minus zero"
    assert LOSS.difference_words("zero", "noisy") == "zero minus noisy"


def test_noise_that_raises_accuracy_helped():
    accuracy = Goal("eval_accuracy", "max")
    zero = (0.60, 0.64, 0.62, 0.66)
    cases = {"helped": (0.63, 0.66, 0.65, 0.68), "hurt": (0.57, 0.62, 0.58, 0.63), "none": (0.64, 0.61, 0.65, 0.64)}
    for outcome, noisy in cases.items():
        paired = pair_up(NOISE, {**{("zero", k + 1): v for k, v in enumerate(zero)},
                                 **{("noisy", k + 1): v for k, v in enumerate(noisy)}}, accuracy)
        assert paired.diffs == pytest.approx([n - z for z, n in zip(zero, noisy)])  # noisy minus zero
        assert paired.outcome == outcome
        assert "(final eval accuracy, noisy minus zero at the same seed" in paired.sentence()
        if outcome == "helped":
            assert paired.sentence().startswith("noise helped by ") and paired.low > 0
    # The same numbers as losses: higher is worse, so the verdict turns around.
    as_loss = pair_up(NOISE, {**{("zero", k + 1): v for k, v in enumerate(zero)},
                              **{("noisy", k + 1): v for k, v in enumerate(cases["helped"])}}, LOSS)
    assert as_loss.outcome == "hurt" and as_loss.mean == pytest.approx(-paired_mean(zero, cases["helped"]))


def paired_mean(zero, noisy) -> float:
    return sum(n - z for z, n in zip(zero, noisy)) / len(zero)


def _trial(cfg, parent, trial_id, accuracies, phase="search", tags=None, name=None):
    """A child run as a trial logs it: params from its config, eval metrics by tick, then its status."""
    tracker = start_trial_run(cfg, parent, trial_id, run_name=name or f"trial-{trial_id}", phase=phase, tags=tags)
    for tick, value in enumerate(accuracies, start=1):
        tracker.log_metrics({"eval_accuracy": value, "eval_loss": 1 - value, "loss": 1.5 - value, "tick": tick},
                            step=tick)
    tracker.client.set_terminated(tracker.target.run_id, "FINISHED")
    return tracker


def test_trials_ranked_reported_and_listed_by_a_metric_to_maximise(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    cfg = load_config(SWEEP_YAML, [*CLASSIFY, "sweep.metric=eval_accuracy", f"tracking.uri={uri}",
                                   "sweep.confirm.seeds=2", "noise.sigma=0.05"])
    parent = start_run(cfg, "classify-sweep", tags={"pipeline.role": "sweep"}, command="pipeline tune")
    for trial_id, curve in (("t-low", [0.50, 0.55]), ("t-high", [0.60, 0.71]), ("t-peaked", [0.80, 0.65])):
        _trial(cfg, parent.target, trial_id, curve)
    goal = sweep_goal(parent.target)
    assert goal == Goal("eval_accuracy", "max")
    search = collect_trials(parent.target)  # the goal read back from the parent run
    assert [t.trial_id for t in search] == ["t-high", "t-peaked", "t-low"]  # by final value, highest first
    assert [t.best_value for t in search] == [0.71, 0.80, 0.55]

    plan = plan_confirmation(cfg, [(t.trial_id, t.value, {"noise.sigma": t.sigma}) for t in search])
    assert plan.source == "trial t-high"
    for seed, (zero, noisy) in enumerate(((0.60, 0.66), (0.62, 0.69)), start=1):
        for arm, value in (("zero", zero), ("noisy", noisy)):
            _trial(cfg, parent.target, f"c-{arm}-{seed}", [value], phase="confirm",
                   tags={ARM_TAG: arm, SEED_TAG: str(seed)}, name=f"confirm-{arm}-seed{seed}")
    confirmation = confirm_report(parent, plan, tmp_path, goal)
    metrics = parent.client.get_run(parent.target.run_id).data.metrics
    assert metrics["confirm_noise_diff"] == pytest.approx(0.065)  # noisy minus zero: accuracy went up
    assert metrics["confirm_noisy_eval_accuracy"] == pytest.approx(0.675)
    assert confirmation.paired[0].outcome == "helped"  # 0.065 ± 0.064 over 2 seeds
    with (tmp_path / "confirm.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header[-2:] == ["eval_accuracy", "best_eval_accuracy"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["runs", "--sweep", parent.target.run_id[:8]]) == 0
    search_table, _, confirm_table = capsys.readouterr().out.partition("confirmation runs (paired by seed)")
    lines = search_table.splitlines()
    assert lines[1].split()[-2:] == ["eval", "accuracy"]
    assert [row.split()[0] for row in lines[3:] if row.strip()] == ["t-high", "t-peaked", "t-low"]
    assert [float(row.split()[-1]) for row in confirm_table.splitlines()[3:] if row.strip()] == [0.66, 0.6, 0.69, 0.62]


def test_a_default_sweep_and_one_from_before_the_metric_optimise_eval_loss(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    cfg = load_config(SWEEP_YAML, [f"tracking.uri={uri}"])
    parent = start_run(cfg, "default-sweep", tags={"pipeline.role": "sweep"})
    assert sweep_goal(parent.target) == LOSS  # its params: sweep.metric eval_loss, sweep.mode None
    bare = parent.client.create_run(parent.client.get_run(parent.target.run_id).info.experiment_id).info.run_id
    assert sweep_goal(RunTarget(uri, bare)) == LOSS  # no sweep.* params at all
