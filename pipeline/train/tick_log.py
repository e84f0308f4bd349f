"""Per-tick metrics that stay one value per tick, in order, across worker-group restarts.

After a restart the workers resume from the last checkpoint and redo the ticks after it, which MLflow
may already hold (its metric history is append-only). Those ticks are not logged a second time;
their recomputed loss is compared with the logged one instead, and the run is tagged with what was
redone and how closely it matched, so a restart is visible and its exactness checkable.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.tracking import RunTracker


class TickLog:
    """`carried`: the metrics rank 0 had not yet sent when the checkpoint resumed from was written
    (only for a checkpoint of this same run); they are sent now unless MLflow already has them."""

    def __init__(self, tracker: RunTracker, resumed_tick: int, say: Callable[[str], None], carried: list | tuple = ()):
        self.tracker = tracker
        self.say = say
        self.resumed_tick = resumed_tick
        self.last_logged = -1  # the highest tick this run already has in MLflow
        self.logged_loss: dict[int, float] = {}
        self.restart = 0
        self.max_rel_diff = 0.0
        self._read_history(list(carried))

    def _read_history(self, carried: list) -> None:
        try:
            ticks = self.tracker.history("tick")
            self.logged_loss = self.tracker.history("loss")
            tags = self.tracker.tags()
        except Exception as exc:  # noqa: BLE001 - a tracking outage must not stop training
            self.say(f"[pipeline] warning: could not read the ticks this run already logged ({exc}); "
                     "after a restart, redone ticks may appear twice")
            self._resend(carried)
            return
        self.last_logged = max(ticks, default=-1)
        resent = self._resend(carried)
        self.last_logged = max([self.last_logged, *resent])
        if self.last_logged < 0:
            return
        self.restart = int(tags.get("pipeline.restarts", "0")) + 1
        redone = (f"redoing ticks {self.resumed_tick + 1}-{self.last_logged} (already logged; compared, not "
                  "logged again)" if self.last_logged > self.resumed_tick else "no tick to redo")
        note = f"restart {self.restart}: resumed at tick {self.resumed_tick}; {redone}"
        if resent:
            note += f"; sent ticks {min(resent)}-{max(resent)}, which were still buffered when the worker died"
        self.tracker.set_tags({"pipeline.restarts": str(self.restart), f"pipeline.restart.{self.restart}": note})
        self.say(f"[pipeline] {note}")

    def _resend(self, carried: list) -> list[int]:
        steps = []
        for metrics, step, timestamp_ms in carried:
            if step > self.last_logged:
                self.tracker.log_metrics(metrics, step, timestamp_ms)
                steps.append(step)
        return steps

    def unsent(self) -> list:
        return self.tracker.unsent_metrics()

    def log(self, metrics: dict[str, float], tick: int) -> None:
        if tick > self.last_logged:
            self.tracker.log_metrics(metrics, step=tick)
            return
        logged = self.logged_loss.get(tick)
        if "loss" in metrics and logged is not None:
            self.max_rel_diff = max(self.max_rel_diff, abs(metrics["loss"] - logged) / max(abs(logged), 1e-12))
        if tick == self.last_logged and tick > self.resumed_tick:
            self.tracker.set_tags({f"pipeline.restart.{self.restart}.max_rel_loss_diff": f"{self.max_rel_diff:.3e}"})
            self.say(f"[pipeline] restart {self.restart}: redone ticks match the logged losses within "
                     f"{self.max_rel_diff:.1e} (relative)")
