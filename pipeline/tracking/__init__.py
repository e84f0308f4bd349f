"""MLflow tracking: runs, per-tick metrics, models, and the `runs` table."""

from pipeline.tracking.classifier import log_classifier, log_label_map
from pipeline.tracking.runs import format_runs, latest_metrics, recent_runs, run_page
from pipeline.tracking.store import (
    NullTracker,
    RunTarget,
    RunTracker,
    Tracker,
    TrackingUnreachable,
    check_reachable,
    load_pyfunc,
    log_adapter,
    log_hf_model,
    run_status,
    set_status,
    start_run,
    tracking_uri,
)
from pipeline.tracking.ui import ModelPlan, run_page_url

__all__ = ["ModelPlan", "NullTracker", "RunTarget", "RunTracker", "Tracker", "TrackingUnreachable", "check_reachable",
           "format_runs", "latest_metrics", "load_pyfunc", "log_adapter", "log_classifier", "log_hf_model", "log_label_map", "recent_runs",
           "run_page", "run_page_url", "run_status", "set_status", "start_run", "tracking_uri"]
