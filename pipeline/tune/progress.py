"""A sweep's progress on the console: trials done of all, how many run now, how many ASHA stopped,
and the best value of the sweep's metric so far (`pipeline.console` draws it as a bar on a terminal)."""

from __future__ import annotations

import math

from ray import tune

from pipeline import console
from pipeline.tune.goal import LOSS, Goal
from pipeline.tune.trial import trained_every_tick


class SweepProgress(tune.Callback):
    """Counted from Tune's own trial list at every event, so a resumed sweep counts its earlier
    trials too. Module level on purpose: Tune pickles callbacks into the experiment state."""

    def __init__(self, noun: str, total: int, max_ticks: int, goal: Goal):
        self.noun, self.total, self.max_ticks, self.goal = noun, total, max_ticks, goal

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trials)

    # Tune calls these before it changes the trial's status: the trial is counted as it will be.
    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trials, ending=(trial, "TERMINATED"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trials, ending=(trial, "ERROR"))

    def _show(self, trials: list, ending: tuple | None = None) -> None:
        status = {t.trial_id: t.status for t in trials}
        if ending is not None:
            status[ending[0].trial_id] = ending[1]
        ended = [t for t in trials if status[t.trial_id] in ("TERMINATED", "ERROR")]
        stopped = sum(status[t.trial_id] == "TERMINATED" and not trained_every_tick(t, self.max_ticks) for t in ended)
        failed = sum(status[t.trial_id] == "ERROR" for t in ended)
        fields = [f"{sum(s == 'RUNNING' for s in status.values())} running", f"{stopped} stopped by ASHA"]
        if failed:
            fields.append(f"{failed} failed")
        # A callback pickled by a sweep from before sweep.metric existed has no goal: it optimised eval loss.
        goal = getattr(self, "goal", LOSS)
        values = {t.trial_id: (t.last_result or {}).get(goal.metric, math.nan) for t in trials}
        best = min((trial_id for trial_id, value in values.items() if math.isfinite(value)),
                   key=lambda trial_id: goal.rank_key(values[trial_id]), default=None)
        if best is not None:
            fields.append(f"best {goal.label} {values[best]:.4f} (trial {best})")
        console.progress(self.noun, len(ended), max(self.total, len(trials)), fields)
