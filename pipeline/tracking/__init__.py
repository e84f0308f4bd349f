"""MLflow tracking: runs, per-tick metrics, models, and the `runs` table."""

from pipeline.tracking.runs import format_runs, recent_runs
from pipeline.tracking.store import (
    NullTracker,
    RunTarget,
    Tracker,
    TrackingUnreachable,
    check_reachable,
    end_run,
    load_pyfunc,
    log_hf_model,
    start_run,
    tracking_uri,
)

__all__ = ["NullTracker", "RunTarget", "Tracker", "TrackingUnreachable", "check_reachable", "end_run", "format_runs", "load_pyfunc", "log_hf_model",
           "recent_runs", "start_run", "tracking_uri"]
