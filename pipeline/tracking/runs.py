"""`pipeline runs`: a table of recent runs, read back from MLflow."""

from __future__ import annotations

from pipeline.tracking.store import RunTarget, client_for
from pipeline.tracking.ui import run_page_url

LOCAL_UI = "http://127.0.0.1:5000"  # where `pipeline ui` serves a local store by default


def run_page(target: RunTarget) -> str:
    """The run's page in the UI, opened in Model training: on its tracking server, or where
    `pipeline ui` serves a local store."""
    experiment_id = client_for(target.uri).get_run(target.run_id).info.experiment_id
    return (run_page_url(target.uri, experiment_id, target.run_id)
            or run_page_url(LOCAL_UI, experiment_id, target.run_id))


def latest_metrics(target: RunTarget) -> dict[str, float]:
    """Each metric's newest value in the run, as MLflow holds them."""
    return dict(client_for(target.uri).get_run(target.run_id).data.metrics)


def recent_runs(uri: str, experiment: str, limit: int = 20) -> list[dict]:
    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit)
    rows = []
    for run in runs:
        info, metrics = run.info, run.data.metrics
        history = client.get_metric_history(info.run_id, "eval_loss") if "eval_loss" in metrics else []
        end = info.end_time or info.start_time
        rows.append({
            "run_id": info.run_id,
            "name": info.run_name or "",
            "status": info.status,
            "best_eval_loss": min((m.value for m in history), default=None),
            "ticks": int(metrics["tick"]) if "tick" in metrics else None,
            "duration_s": (end - info.start_time) / 1000 if info.start_time else None,
        })
    return rows


def format_runs(rows: list[dict]) -> str:
    if not rows:
        return "no runs yet"
    header = f"{'run id':32}  {'name':28}  {'status':9}  {'best eval loss':>14}  {'ticks':>6}  {'duration':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        loss = f"{r['best_eval_loss']:.4f}" if r["best_eval_loss"] is not None else "-"
        ticks = str(r["ticks"]) if r["ticks"] is not None else "-"
        duration = f"{r['duration_s']:.0f}s" if r["duration_s"] is not None else "-"
        lines.append(f"{r['run_id']:32}  {r['name'][:28]:28}  {r['status']:9}  {loss:>14}  {ticks:>6}  {duration:>9}")
    return "\n".join(lines)
