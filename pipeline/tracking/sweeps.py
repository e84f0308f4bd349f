"""MLflow for sweeps: a parent run per sweep, one nested child run per trial, the registry.

Children carry the standard `mlflow.parentRunId` tag (the MLflow UI nests them) and
`pipeline.trial_id`, so a restored sweep finds its trials' runs again instead of duplicating them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Config
from pipeline.tracking import ui
from pipeline.tracking.store import RunTarget, Tracker, client_for, set_status, start_run, using_tracking_uri

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "pipeline.trial_id"
ROLE_TAG = "pipeline.role"  # sweep (the parent) | trial
PHASE_TAG = "pipeline.phase"  # a trial's: search (Tune's search with ASHA) | confirm (the paired re-runs)
ARM_TAG = "pipeline.confirm.arm"  # a confirmation run's arm (noisy | zero | neftune) and seed k
SEED_TAG = "pipeline.confirm.seed"

if TYPE_CHECKING:
    from pipeline.data import PreparedData


def child_runs(target: RunTarget) -> list:
    """Every trial run under the parent `target`, oldest first."""
    client = client_for(target.uri)
    parent = client.get_run(target.run_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{target.run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=10_000)


def trial_run(parent: RunTarget, trial_id: str) -> RunTarget | None:
    """The child run of one trial, if the trial already started one (a restored sweep)."""
    for run in child_runs(parent):
        if run.data.tags.get(TRIAL_TAG) == trial_id:
            return RunTarget(parent.uri, run.info.run_id)
    return None


def start_trial_run(cfg: Config, parent: RunTarget, trial_id: str, run_name: str, phase: str = "search",
                    tags: dict[str, str] | None = None, data: PreparedData | None = None,
                    checkpoints: str | None = None) -> Tracker:
    """Find the trial's child run (and mark it running again) or create it, nested under the parent.
    A new one declares the model the trial trains, whose `checkpoints` (the trial's Train run
    directory) stay outside MLflow, as an output of the trial and of the parent: the UI then files
    both under training runs."""
    existing = trial_run(parent, trial_id)
    if existing is not None:
        return reopen_run(existing)
    model = ui.ModelPlan(tags={ui.CHECKPOINTS_TAG: checkpoints} if checkpoints else {}, also_output_of=parent.run_id)
    return start_run(cfg, run_name, tags={PARENT_TAG: parent.run_id, TRIAL_TAG: trial_id, ROLE_TAG: "trial",
                                          PHASE_TAG: phase, **(tags or {})}, command="pipeline tune", data=data, model=model)


def phase_of(run) -> str:
    """A child run's phase; runs of sweeps from before confirmation existed have no tag and were all search."""
    return run.data.tags.get(PHASE_TAG, "search")


def close_running_children(parent: RunTarget, status: str = "KILLED", stopped_by: str = "interrupt") -> int:
    """No trial run may stay RUNNING after a sweep ends, however it ends. Returns how many were closed."""
    closed = 0
    for run in child_runs(parent):
        if run.info.status == "RUNNING":
            set_status(RunTarget(parent.uri, run.info.run_id), status, stopped_by)
            closed += 1
    return closed


def reopen_run(target: RunTarget) -> Tracker:
    client_for(target.uri).update_run(target.run_id, status="RUNNING")
    return Tracker(target)


def log_artifact(tracker: Tracker, path: Path) -> None:
    tracker.client.log_artifact(tracker.target.run_id, str(path))


def register_model(model_uri: str, name: str, tags: dict[str, str], uri: str) -> int:
    """Register a logged model under `name` with tags; returns the new version number."""
    import mlflow

    with using_tracking_uri(uri):
        version = mlflow.register_model(model_uri, name, tags=tags)
    return int(version.version)


def resolve_sweep_id(uri: str, prefix: str) -> str:
    """A sweep's parent run id from the id itself or a unique prefix of it (`pipeline runs --sweep`)."""
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    try:
        return client.get_run(prefix).info.run_id
    except MlflowException:
        pass
    matches = [run.info.run_id for experiment in client.search_experiments()
               for run in client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'",
                                             max_results=10_000) if run.info.run_id.startswith(prefix)]
    if len(matches) != 1:
        raise ValueError(f"sweep {prefix!r}: {'no' if not matches else 'more than one'} sweep run matches")
    return matches[0]
