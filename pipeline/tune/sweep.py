"""`pipeline tune`: a Ray Tune sweep over config paths, recorded in MLflow as one parent run.

    prepare once (model + packed data, fingerprint cache) -> parent run -> search: Tuner(run_trial
    per trial, Optuna TPE or random, ASHA on sweep.metric by tick) -> trials table, CSV, plots ->
    confirmation: a second Tuner (the confirmed config and its σ = 0 twin, and a NEFTune twin, on
    sweep.confirm.seeds fresh seeds) -> paired differences, intervals, verdict -> the best search
    trial's model exported, logged and registered

The experiment directory (`sweep.storage_dir/<name>`, a local path or a URI) keeps Tune's state
(the confirmation's in `confirm/`) plus `sweep.json` (the parent run), `sweep-config.yaml`, the
confirmation plan and the report, so `pipeline tune --resume DIR` continues an interrupted sweep,
in either phase.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from pipeline import console, storage
from pipeline.config import EVAL_METRICS, Config, ConfigError, describe_error, to_yaml
from pipeline.tracking import RunTarget, Tracker
from pipeline.tune.goal import Goal

if TYPE_CHECKING:
    from pipeline.data import PreparedData

STATE_FILE = "sweep.json"
CONFIG_FILE = "sweep-config.yaml"


@dataclass(frozen=True)
class SweepOutcome:
    parent_run_id: str
    experiment: str  # the experiment directory's location: a local path or a URI
    interrupted: bool
    table: str = ""
    verdict: str = ""
    registered: str | None = None

    @property
    def experiment_dir(self) -> Path:
        """The experiment directory as a local path (when sweep.storage_dir is not object storage)."""
        return storage.local_path(self.experiment)

    def summary(self) -> str:
        if self.interrupted:
            return (f"sweep interrupted; its finished trials are kept.\n"
                    f"  continue: pipeline tune --resume {self.experiment}")
        lines = [self.table, "", self.verdict, f"MLflow parent run {self.parent_run_id}",
                 f"  trials:  pipeline runs --sweep {self.parent_run_id[:8]}"]
        if self.registered:
            lines.append(f"  best model: mlflow.pyfunc.load_model('{self.registered}')")
        return "\n".join(lines)


def check_sweep(cfg: Config) -> None:
    from pipeline.tune.arms import check_confirm_only
    from pipeline.tune.space import check_space

    metric, reported = cfg.sweep.metric, EVAL_METRICS[cfg.model.task]
    if metric not in reported and any(metric in names for names in EVAL_METRICS.values()):
        raise ConfigError(f"sweep.metric: model.task '{cfg.model.task}' does not report '{metric}'; its evaluation "
                          f"reports {', '.join(reported)}")
    if cfg.sweep.confirm.only:  # no search: no space, no ASHA to feed
        check_confirm_only(cfg)
        return
    check_space(cfg)
    train = cfg.train
    if train.eval_every == 0:
        raise ConfigError("train.eval_every: a sweep needs evaluations during training for ASHA; set it, "
                          f"e.g. to sweep.scheduler.grace_period ({cfg.sweep.scheduler.grace_period})")
    if train.checkpoint_every % train.eval_every:
        raise ConfigError(f"train.checkpoint_every: in a sweep it must be a multiple of train.eval_every "
                          f"({train.eval_every}): every result Tune sees must carry {metric}")


def run_sweep(cfg: Config | None = None, resume: str | None = None) -> SweepOutcome:
    """Run (or, with `resume`, an experiment directory's location, continue) a sweep; returns what it found."""
    from pipeline import tracking
    from pipeline.tracking.sweeps import close_running_children, reopen_run
    from pipeline.train import check_against_data, prepare

    if resume is not None:
        experiment_dir = storage.resolve(str(resume))
        cfg, state = _load_state(experiment_dir)
        storage.configure(cfg.storage)  # the sweep's own settings from here on (its state was read with the defaults)
    check_sweep(cfg)
    model_ref, data = prepare(cfg)  # once for every trial: trials read the same packed cache
    console.echo(data.summary())
    check_against_data(cfg, data)
    concurrency = trials_at_once(cfg)  # before anything is recorded: a refused sweep leaves no parent run
    if resume is None:
        name = cfg.sweep.name or f"{cfg.tracking.experiment}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        experiment_dir = storage.join(storage.resolve(cfg.sweep.storage_dir), name)
        parent = tracking.start_run(cfg, name, tags={"pipeline.role": "sweep"}, command="pipeline tune", data=data)
        _save_state(experiment_dir, cfg, parent.target)
    else:
        parent = reopen_run(RunTarget(state["tracking_uri"], state["parent_run_id"]))
    sweep = _Sweep(cfg, model_ref, data, parent, experiment_dir, concurrency)
    try:
        outcome = sweep.run(resume is not None)
    except BaseException as error:
        close_running_children(parent.target)
        interrupted = isinstance(error, KeyboardInterrupt)
        tracking.set_status(parent.target, "KILLED" if interrupted else "FAILED", "interrupt" if interrupted else None)
        raise
    if outcome.interrupted:
        tracking.set_status(parent.target, "KILLED", "interrupt")
    else:
        tracking.set_status(parent.target, "FINISHED")
    return outcome


@dataclass
class _Sweep:
    """One sweep's phases: the search (unless confirm.only), the confirmation (unless confirm.seeds
    is 0), then the report, the registered model and the optimizer states dropped."""

    cfg: Config
    model_ref: str
    data: PreparedData
    parent: Tracker
    experiment_dir: str
    concurrency: int

    @property
    def goal(self) -> Goal:
        return Goal.of(self.cfg.sweep)

    def run(self, resume: bool) -> SweepOutcome:
        from pipeline.tune.confirm import confirm_tuner, confirmation_plan
        from pipeline.tune.summary import collect_trials, format_confirm_table, format_table, settings

        cfg, target = self.cfg, self.parent.target
        interrupted = SweepOutcome(target.run_id, self.experiment_dir, interrupted=True)
        search, best, params, checkpoints, tables = None, None, {}, {}, []
        if not cfg.sweep.confirm.only:
            results = _tuner(cfg, self.model_ref, self.data, target, self.experiment_dir, resume, self.concurrency).fit()
            if _cut_short(target, results, cfg.sweep.num_samples):
                return interrupted
            search = collect_trials(target, goal=self.goal)
            params = {r.metrics["trial_id"]: r.config for r in results if r.metrics}
            checkpoints = _checkpoints(results)
            best = self._search_report(search)
            tables.append(format_table(search, self.goal))
            console.echo(tables[-1])
        lines = [] if best is None else [f"best search trial {best.trial_id}: {settings(best)}, "
                                         f"final {self.goal.label} {best.value:.4f}"]
        if cfg.sweep.confirm.seeds:
            plan = confirmation_plan(cfg, self.experiment_dir, search, params, resume)
            if plan is None:
                lines.append("no confirmation: no search trial had noise on (every one ran at σ = 0)")
            else:
                results = confirm_tuner(cfg, self.model_ref, self.data, target, self.experiment_dir, plan,
                                        self.concurrency, resume).fit()
                if _cut_short(target, results, plan.runs):
                    return interrupted
                checkpoints.update(_checkpoints(results))
                confirmation = self._confirm_report(plan)
                lines += confirmation.sentences()
                tables.append(format_confirm_table(confirmation.runs, self.goal))
                if best is None:  # confirm.only: the noisy arm's best seed is the model to keep
                    best = confirmation.best_noisy()
                    if best is not None:
                        self._log_best(best)
        else:
            lines.append("no confirmation (sweep.confirm.seeds: 0): the search alone does not tell whether noise helped")
        verdict = "\n".join(lines)
        self.parent.log_text(verdict + "\n", "verdict.txt")
        registered = None
        if best is not None:
            registered = _register_best(cfg, self.model_ref, self.parent, best, checkpoints.get(best.trial_id)
                                        or _newest_checkpoint(self.experiment_dir, best.trial_id), self.experiment_dir,
                                        self.data.label_names)
            _keep_optimizer_state_of(best.trial_id, self.experiment_dir)
        return SweepOutcome(target.run_id, self.experiment_dir, interrupted=False, table="\n\n".join(tables),
                            verdict=verdict, registered=registered)

    def _search_report(self, trials):
        from pipeline.tune.summary import best_trial, write_csv, write_plots

        goal = self.goal
        best = best_trial(trials, goal)
        with self._report() as report_dir:
            write_csv(trials, report_dir / "trials.csv", goal)
            write_plots(trials, report_dir, goal)
        self._log_best(best)
        self.parent.log_metrics({goal.best_metric: best.value, "trials": len(trials)}, step=0)
        return best

    def _log_best(self, best) -> None:
        """The run the sweep keeps (its model is the registered one), as the parent's `best.*` params."""
        self.parent.log_params({"best.trial_id": best.trial_id, "best.noise.sigma": best.sigma, "best.train.lr": best.lr})

    def _confirm_report(self, plan):
        from pipeline.tune.confirm import confirm_report

        with self._report() as report_dir:
            return confirm_report(self.parent, plan, report_dir, self.goal)

    @contextlib.contextmanager
    def _report(self) -> Iterator[Path]:
        """A directory for report files: on leaving it, each is logged to the parent run and stored
        in <experiment>/report."""
        from pipeline.tracking.sweeps import log_artifact

        with tempfile.TemporaryDirectory(prefix="sweep-report-") as report_dir:  # written here, then stored
            yield Path(report_dir)
            for path in sorted(Path(report_dir).iterdir()):
                log_artifact(self.parent, path)
            storage.upload_dir(Path(report_dir), storage.join(self.experiment_dir, "report"))


def _cut_short(parent: RunTarget, results, expected: int) -> bool:
    """Ctrl-C makes Tune save its state and return early. Trials it cut short still have RUNNING
    runs (ended ones were closed by TrialRunStatus), or are pending with no result at all."""
    from pipeline.tracking.sweeps import close_running_children

    cut_short = close_running_children(parent)
    return bool(cut_short or len(results) < expected or any(
        "tick" not in (result.metrics or {}) and result.error is None for result in results))


def _checkpoints(results) -> dict[str, str]:
    return {r.metrics.get("trial_id"): r.metrics.get("checkpoint_path") for r in results if r.metrics}


def trials_at_once(cfg: Config) -> int:
    """sweep.max_concurrent_trials, or with 0 as many trials as the cluster fits (or can scale to).
    Each trial's TorchTrainer reserves its own workers (Ray Train V2 places them in a placement group
    of its own, which a Tune bundle cannot hold for it), so the fit is checked here, up front."""
    from pipeline.train import describe, runs_that_fit, worker_bundle
    from pipeline.tune.trial import TRIAL_CPUS

    per_trial = {key: amount * cfg.train.num_workers for key, amount in worker_bundle(cfg).items()}
    per_trial["CPU"] += TRIAL_CPUS
    fits, asked = runs_that_fit(per_trial), cfg.sweep.max_concurrent_trials
    if asked > fits or fits == 0:
        raise ConfigError(f"sweep.max_concurrent_trials: {asked or 1} trials at once need "
                          f"{describe({k: v * (asked or 1) for k, v in per_trial.items()})}, and {fits} fit in what "
                          f"the Ray cluster has (or can scale to); set it to at most {fits}, or 0 for as many as fit")
    return asked or fits


def _tuner(cfg: Config, model_ref: str, data, parent: RunTarget, experiment_dir: str, resume: bool,
           concurrency: int):
    from ray import tune

    from pipeline.tune.progress import SweepProgress
    from pipeline.tune.trial import TrialPlan, TrialRunStatus, trainable

    # The trials' Train runs go beside the experiment directory (Tune owns what is inside it).
    run = trainable(TrialPlan(config=cfg, model_ref=model_ref, data=data, parent=parent,
                              trials_dir=f"{experiment_dir}-trials"))
    # Tune, like Ray Train, takes a path inside a filesystem plus the filesystem (ours: same endpoint).
    filesystem, fs_path = storage.filesystem(experiment_dir)
    if resume:
        return tune.Tuner.restore(fs_path, trainable=run, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False, storage_filesystem=filesystem)
    param_space, first_points = _space(cfg)
    return tune.Tuner(
        run, param_space=param_space,
        tune_config=tune.TuneConfig(metric=cfg.sweep.metric, mode=cfg.sweep.metric_mode,
                                    search_alg=_searcher(cfg, first_points, concurrency),
                                    scheduler=_scheduler(cfg), num_samples=cfg.sweep.num_samples),
        run_config=tune.RunConfig(name=posixpath.basename(fs_path), storage_path=posixpath.dirname(fs_path),
                                  storage_filesystem=filesystem,
                                  callbacks=[TrialRunStatus(parent, cfg.train.max_ticks),
                                             SweepProgress("trial", cfg.sweep.num_samples, cfg.train.max_ticks,
                                                           Goal.of(cfg.sweep))]),
    )


def _space(cfg: Config):
    from pipeline.tune.space import effective_space, tune_space

    return tune_space(effective_space(cfg))


def _searcher(cfg: Config, first_points: list[dict], concurrency: int):
    """The search, holding at most `concurrency` trials at once itself: TuneConfig's
    max_concurrent_trials is dropped with only a warning for random search's generator."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.sweep.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=first_points, seed=cfg.sweep.seed),
                                      max_concurrent=concurrency)
        except ImportError as error:  # optuna is a dependency, but a trimmed install may lack it
            warnings.warn(f"sweep.search: optuna unavailable ({error}); falling back to random search", stacklevel=2)
    return BasicVariantGenerator(points_to_evaluate=first_points, random_state=cfg.sweep.seed,
                                 max_concurrent=concurrency)


def _scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: otherwise ASHA "stops" every trial at max_t, and a trial that ran to
    # its end would look stopped early (and its driver would never get to report completion).
    return ASHAScheduler(time_attr="tick", grace_period=cfg.sweep.scheduler.grace_period,
                         max_t=cfg.train.max_ticks, reduction_factor=cfg.sweep.scheduler.reduction_factor,
                         stop_last_trials=False)


def _keep_optimizer_state_of(best_trial: str, experiment_dir: str) -> None:
    """Every other trial's checkpoints keep their weights only: the optimizer state (2/3 of a
    checkpoint with Adam) is only worth keeping for the run one would continue."""
    from pipeline.train import drop_optimizer_state

    trials_dir = f"{experiment_dir}-trials"
    freed = sum(drop_optimizer_state(checkpoint) for trial in storage.subdirectories(trials_dir)
                if posixpath.basename(trial) != f"trial-{best_trial}"
                for checkpoint in storage.subdirectories(trial) if posixpath.basename(checkpoint).startswith("checkpoint_"))
    if freed:
        console.say(f"dropped the optimizer state of the other trials' checkpoints ({freed / 2**20:.1f} MiB); "
                    f"trial {best_trial} keeps its own")


def _newest_checkpoint(experiment_dir: str, trial_id: str) -> str | None:
    """The trial's newest valid checkpoint in its Train run's storage: the fallback when Tune's last
    result of the trial is a training report that overtook its driver's final one (which names it)."""
    from pipeline.train import CheckpointError, choose_checkpoint

    try:
        return choose_checkpoint(storage.join(f"{experiment_dir}-trials", f"trial-{trial_id}"))[0]
    except CheckpointError:
        return None


def _register_best(cfg: Config, model_ref: str, parent: Tracker, best, checkpoint: str | None,
                   experiment_dir: str, label_names: tuple[str, ...]) -> str | None:
    """Export the best trial's final checkpoint (its location, reported by its driver), log it to its
    run, register it. A sweep resumed after it registered its model keeps that version."""
    from pipeline.tracking.sweeps import register_model
    from pipeline.train import export_in_task

    if checkpoint is None or not cfg.tracking.log_model:
        return None
    if "registered_model" in parent.tags():
        return parent.tags()["registered_model"]
    model = export_in_task(cfg, checkpoint, model_ref, storage.join(experiment_dir, "best-model"),
                           RunTarget(parent.target.uri, best.run_id), label_names=label_names)
    model_uri = model.model_uri
    name = cfg.sweep.register_model or f"{cfg.tracking.experiment}-best"
    version = register_model(model_uri, name, {"sweep_id": parent.target.run_id, "noise.sigma": str(best.sigma),
                                               "train.lr": str(best.lr), "trial_id": best.trial_id,
                                               "phase": "confirm" if best.arm else "search"},
                             parent.target.uri)
    parent.set_tags({"registered_model": f"models:/{name}/{version}"})
    return f"models:/{name}/{version}"


def _save_state(experiment_dir: str, cfg: Config, parent: RunTarget) -> None:
    storage.write_text(storage.join(experiment_dir, CONFIG_FILE), to_yaml(cfg))
    storage.write_text(storage.join(experiment_dir, STATE_FILE),
                       json.dumps({"parent_run_id": parent.run_id, "tracking_uri": parent.uri}))


def sweep_config(resume: str) -> Config:
    """The config a sweep directory was started with (what `--resume` continues)."""
    return _load_state(storage.resolve(str(resume)))[0]


def _load_state(experiment_dir: str) -> tuple[Config, dict]:
    state_file = storage.join(experiment_dir, STATE_FILE)
    if not storage.exists(state_file):
        raise ConfigError(f"--resume: {experiment_dir} is not a sweep directory (no {STATE_FILE})")
    config_file = storage.join(experiment_dir, CONFIG_FILE)
    try:  # written by _save_state: a whole config (no `extends:`), so it is validated as it stands
        cfg = Config.model_validate(yaml.safe_load(storage.read_text(config_file)))
    except ValidationError as exc:
        raise ConfigError(f"--resume: {config_file}: " + "; ".join(describe_error(e) for e in exc.errors())) from None
    return cfg, json.loads(storage.read_text(state_file))
