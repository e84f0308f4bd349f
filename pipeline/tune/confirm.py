"""The sweep's paired confirmation: the confirmed config and its twins (pipeline.tune.arms), each
on the same fresh seeds, run as a second Tune run and judged by paired differences (pipeline.tune.paired).

The second Tune run is a grid over arm × seed without a scheduler (every run trains to
train.max_ticks, so the pairs compare like with like), stored in `<experiment>/confirm`; its plan
is saved first as `<experiment>/confirm-plan.json`. `pipeline tune --resume` reads the plan again
and restores that Tune run, so finished confirmation runs are kept, not repeated.
"""

from __future__ import annotations

import math
import posixpath
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.config import Config
from pipeline.tracking import RunTarget, Tracker
from pipeline.tune.arms import ConfirmPlan, plan_confirmation
from pipeline.tune.goal import Goal
from pipeline.tune.paired import COMPARISONS, Paired, pair_up, plot_pairs
from pipeline.tune.summary import CONFIRM_COLUMNS, Trial, collect_trials, settings, write_csv

CONFIRM_DIR = "confirm"
PLAN_FILE = "confirm-plan.json"


def confirmation_plan(cfg: Config, experiment_dir: str, search: list[Trial] | None, params: dict[str, dict],
                      resume: bool) -> ConfirmPlan | None:
    """A resumed sweep's saved plan, or a new one (saved before any confirmation run starts, so a
    resumed sweep confirms the same arms). `search`: the search trials, best first (None with
    `sweep.confirm.only`); `params`: their Tune params by trial id."""
    saved = storage.join(experiment_dir, PLAN_FILE)
    if resume and storage.exists(saved):
        return ConfirmPlan.model_validate_json(storage.read_text(saved))
    ranked = None if search is None else [(t.trial_id, t.value, params[t.trial_id])
                                          for t in search if t.trial_id in params]
    plan = plan_confirmation(cfg, ranked)
    if plan is not None:
        storage.write_text(saved, plan.model_dump_json(indent=1))
    return plan


def confirm_tuner(cfg: Config, model_ref: str, data, parent: RunTarget, experiment_dir: str, plan: ConfirmPlan,
                  concurrency: int, resume: bool):
    """The confirmation's Tuner; a resumed sweep that got as far as starting it restores it."""
    from ray import tune

    from pipeline.tune.progress import SweepProgress
    from pipeline.tune.trial import TrialPlan, TrialRunStatus, trainable

    # The Train runs go beside the search's (trial ids differ between the two Tune runs).
    run = trainable(TrialPlan(config=cfg, model_ref=model_ref, data=data, parent=parent,
                              trials_dir=f"{experiment_dir}-trials", confirm=plan))
    filesystem, fs_path = storage.filesystem(storage.join(experiment_dir, CONFIRM_DIR))
    if resume and tune.Tuner.can_restore(fs_path, storage_filesystem=filesystem):
        return tune.Tuner.restore(fs_path, trainable=run, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False, storage_filesystem=filesystem)
    return tune.Tuner(
        run, param_space={"arm": tune.grid_search(list(plan.arms)), "seed": tune.grid_search(list(plan.seeds))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=posixpath.basename(fs_path), storage_path=posixpath.dirname(fs_path),
                                  storage_filesystem=filesystem,
                                  callbacks=[TrialRunStatus(parent, cfg.train.max_ticks),
                                             SweepProgress("confirmation", plan.runs, cfg.train.max_ticks,
                                                           Goal.of(cfg.sweep))]),
    )


@dataclass(frozen=True)
class Confirmation:
    plan: ConfirmPlan
    goal: Goal
    runs: list[Trial]  # best final value first
    paired: list[Paired]  # the comparisons with at least 2 complete pairs

    def values(self) -> dict[tuple[str, int], float]:
        """(arm, seed) -> the metric's final value in the runs that trained to the end (nan otherwise)."""
        return {(r.arm, r.seed): r.value if r.status == "FINISHED" else math.nan for r in self.runs}

    def sentences(self) -> list[str]:
        noisy = next((r for r in self.runs if r.arm == "noisy"), None)
        what = f" ({settings(noisy)})" if noisy else ""
        lines = [f"confirmation of {self.plan.source}{what} on {len(self.plan.seeds)} seeds, each paired with "
                 f"its twins: " + ", ".join(self.plan.arms)]
        lines += [p.sentence() for p in self.paired]
        done = {p.comparison.name for p in self.paired}
        lines += [f"{c.name}: fewer than 2 seeds where both {c.baseline} and {c.treatment} finished; no interval"
                  for c in COMPARISONS if c.baseline in self.plan.arms and c.treatment in self.plan.arms
                  and c.name not in done]
        return lines + ([f"note: {self.plan.note}"] if self.plan.note else [])

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {"confirm_seeds": len(self.plan.seeds)}
        for arm in self.plan.arms:
            finished = [value for (a, _), value in self.values().items() if a == arm and not math.isnan(value)]
            if finished:
                metrics[f"confirm_{arm}_{self.goal.metric}"] = statistics.fmean(finished)  # mean over its seeds
        for paired in self.paired:
            metrics.update(paired.metrics())
        return metrics

    def best_noisy(self) -> Trial | None:
        """The noisy arm's run with the best final value (what `confirm.only` registers)."""
        return next((r for r in self.runs if r.arm == "noisy" and r.status == "FINISHED"
                     and not math.isnan(r.value)), None)


def confirm_report(parent: Tracker, plan: ConfirmPlan, report_dir: Path, goal: Goal) -> Confirmation:
    """Read the confirmation runs back from MLflow, pair them on `goal`, log the numbers to the
    parent run, and write `confirm.csv` and one paired plot per comparison into `report_dir`."""
    runs = collect_trials(parent.target, phase="confirm", goal=goal)
    values = Confirmation(plan, goal, runs, []).values()
    paired = [p for c in COMPARISONS if c.baseline in plan.arms and c.treatment in plan.arms
              if (p := pair_up(c, values, goal)) is not None]
    confirmation = Confirmation(plan, goal, runs, paired)
    parent.log_metrics(confirmation.metrics(), step=0)
    parent.log_params({"confirm.source": plan.source, "confirm.arms": ",".join(plan.arms)})
    write_csv(runs, report_dir / "confirm.csv", goal, CONFIRM_COLUMNS)
    for p in paired:
        plot_pairs(p, report_dir / f"confirm_{p.comparison.name}.png")
    return confirmation
