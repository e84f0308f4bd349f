"""One Tune trial: a driver function that runs a whole TorchTrainer with the trial's parameters.

Ray Train V2 cannot be handed to a Tuner directly; a function per trial builds and fits the
TorchTrainer, whose rank 0 reports reach Tune through `TuneReportCallback` (eval loss by tick, for
ASHA). A trial of one CPU rank trains in the driver's own process instead (`fit_in_process`: the
same rank, losses and checkpoints), reserving that rank's resources itself: starting a Train
controller and a worker process, each importing Ray and torch again, was most of a small trial.
The trial logs into its own MLflow child run. When ASHA stops a trial this function is simply
killed, so run statuses are set by `TrialRunStatus`, in the process that runs the sweep. The same
driver runs the confirmation's trials (an arm at a seed of a `ConfirmPlan`), tagged phase confirm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline import storage
from pipeline.config import Config
from pipeline.data import PreparedData
from pipeline.tracking import RunTarget, set_status
from pipeline.tracking.sweeps import ARM_TAG, SEED_TAG, start_trial_run, trial_run
from pipeline.tune.arms import ConfirmPlan
from pipeline.tune.space import trial_overrides

COMPLETED = "driver_completed"  # in the last result of a trial that ran to its end
TRIAL_CPUS = 0.01  # the driver function only waits on its TorchTrainer; 0 is refused by Tune
FIRST_EVAL_DIR = "first-eval"  # under the trials' directory


@dataclass(frozen=True)
class TrialPlan:
    """What every trial shares, resolved once by the sweep: config, model, packed data, parent run."""

    config: Config
    model_ref: str
    data: PreparedData
    parent: RunTarget
    trials_dir: str  # where the trials' Train runs are stored: a local path or a URI
    # The confirmation's second Tune run: its trials' params are {"arm", "seed"}, not config paths.
    confirm: ConfirmPlan | None = None


def run_trial(params: dict, plan: TrialPlan) -> None:
    from pipeline.train import fit, fit_in_process, runs_in_process, stored_checkpoint

    entered = time.time()  # the trial's start-up line begins here (`train.startup`)
    storage.configure(plan.config.storage)  # a trial driver is a process of its own
    trial_id = tune.get_context().get_trial_id()
    recorded = {"data": plan.data, "checkpoints": storage.join(plan.trials_dir, f"trial-{trial_id}")}  # in its run
    if plan.confirm is None:
        cfg = plan.config.with_overrides(trial_overrides(params))
        tracker = start_trial_run(cfg, plan.parent, trial_id, run_name=f"trial-{trial_id}", **recorded)
    else:
        arm, seed = params["arm"], params["seed"]
        cfg = plan.config.with_overrides(plan.confirm.overrides(arm, seed))
        tracker = start_trial_run(cfg, plan.parent, trial_id, run_name=f"confirm-{arm}-seed{seed}", phase="confirm",
                                  tags={ARM_TAG: arm, SEED_TAG: str(seed)}, **recorded)
    created = time.time()
    # The Train run is named after the trial: a trial restarted by `pipeline tune --resume` finds
    # its own checkpoints there and continues from them.
    # The trials share their tick-0 evaluation (the same model, eval subset and settings; `train.startup`).
    run = (cfg, plan.model_ref, plan.data, tracker.target, f"trial-{trial_id}", plan.trials_dir)
    shared = {"marks": (("MLflow run", entered), ("trainer", created)),
              "first_eval_dir": storage.join(plan.trials_dir, FIRST_EVAL_DIR)}
    if runs_in_process(plan.config):
        metrics, checkpoint = fit_in_process(*run, listener=lambda reported, _: tune.report(reported), **shared)
    else:
        result = fit(*run, callbacks=[TuneReportCallback()], **shared)
        metrics, checkpoint = result.metrics or {}, stored_checkpoint(result, plan.trials_dir, f"trial-{trial_id}",
                                                                      cfg.train.resume_from)
    tune.report({**metrics, COMPLETED: True, "checkpoint_path": checkpoint, "mlflow_run_id": tracker.target.run_id})


def trainable(plan: TrialPlan):
    """`run_trial` with the plan bound, as Tune runs it (the search's Tuner and the confirmation's).
    A trial that trains in its own process reserves its rank's resources too."""
    return tune.with_resources(tune.with_parameters(run_trial, plan=plan), trial_resources(plan.config))


def trial_resources(cfg: Config) -> dict[str, float]:
    """What a trial's driver reserves: a sliver of CPU to wait on its TorchTrainer (whose workers
    Ray Train reserves), or its rank's bundle as well when it trains in its own process."""
    from pipeline.train import runs_in_process, worker_bundle

    if not runs_in_process(cfg):
        return {"CPU": TRIAL_CPUS}
    bundle = worker_bundle(cfg)
    return {**bundle, "CPU": bundle["CPU"] + TRIAL_CPUS}


class TrialRunStatus(tune.Callback):
    """Closes each trial's child run: FINISHED, KILLED (stopped early by ASHA) or FAILED.

    ASHA has a rung at max_t too, so a trial below that rung's cutoff is stopped at its last tick,
    before its driver reports completion: it trained every tick, so it is FINISHED all the same.
    Module level on purpose: Tune pickles callbacks into the experiment state for `--resume`.
    """

    def __init__(self, parent: RunTarget, max_ticks: int):
        self.parent = parent
        self.max_ticks = max_ticks

    def on_trial_complete(self, iteration, trials, trial, **info):
        target = trial_run(self.parent, trial.trial_id)
        if target is not None:
            if trained_every_tick(trial, self.max_ticks):
                set_status(target, "FINISHED")
            else:
                set_status(target, "KILLED", "asha", stopped_at=(trial.last_result or {}).get("tick"))

    def on_trial_error(self, iteration, trials, trial, **info):
        target = trial_run(self.parent, trial.trial_id)
        if target is not None:
            set_status(target, "FAILED")


def trained_every_tick(trial, max_ticks: int) -> bool:
    """Whether a trial Tune ended trained to its last tick (else ASHA stopped it early)."""
    last = trial.last_result or {}
    return bool(last.get(COMPLETED)) or last.get("tick", 0) >= max_ticks
