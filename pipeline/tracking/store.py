"""MLflow access. The only place in the project that imports mlflow.

The driver opens a run (params, config artifact), rank 0 of the training workers logs per-tick
metrics into it through `Tracker`, and the driver closes it (model, final status).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.config import Config, ConfigError, to_yaml
from pipeline.raw_config import flatten
from pipeline.tracking import ui
from pipeline.tracking.secrets import redact

if TYPE_CHECKING:
    from pipeline.data import PreparedData

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("mlruns")
MAX_PARAM_LENGTH = 6000  # MLflow rejects longer param values
STATUSES = ("FINISHED", "FAILED", "KILLED")
STOPPED_TAG = "pipeline.stopped_by"  # asha | interrupt
STOPPED_AT_TAG = "pipeline.stopped_at_tick"  # the last tick the scheduler saw before it stopped the run


def tracking_uri(configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI wins over the config; the default is a sqlite file under ./mlruns."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def client_for(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    database = _sqlite_file(uri)
    if database:
        database.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> str | None:
    # A sqlite store would otherwise put artifacts in ./mlruns of whatever the current directory is.
    database = _sqlite_file(uri)
    return (database.parent / "artifacts").resolve().as_uri() if database else None


@dataclass(frozen=True)
class RunTarget:
    """What a worker needs to log into an existing run; picklable, no live client."""

    uri: str
    run_id: str


class RunTracker(Protocol):
    """What training logs through: `Tracker` (synchronous), `BufferedTracker` (rank 0's queue that
    survives outages) and `NullTracker` (every other rank, and runs without tracking)."""

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None: ...
    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_table(self, columns: dict[str, list], artifact_file: str) -> None: ...
    def history(self, key: str) -> dict[int, float]: ...
    def tags(self) -> dict[str, str]: ...
    def unsent_metrics(self) -> list[tuple[dict, int, int]]: ...
    def close(self) -> str | None: ...


class Tracker:
    """Logs metrics for one run, synchronously."""

    def __init__(self, target: RunTarget):
        self.target = target
        self.client = client_for(target.uri)

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.target.run_id, metrics=batch)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.target.run_id, params=items[start:start + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.target.run_id, key, redact(str(value)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.target.run_id, redact(text), artifact_file)

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        """Rows appended to the run's table artifact (shown in the UI's artifact and evaluation views)."""
        self.client.log_table(self.target.run_id, data=columns, artifact_file=artifact_file)

    def history(self, key: str) -> dict[int, float]:
        """step -> value of a metric already logged in this run (the last value per step)."""
        return {m.step: m.value for m in self.client.get_metric_history(self.target.run_id, key)}

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.target.run_id).data.tags)

    def unsent_metrics(self) -> list[tuple[dict, int, int]]:
        return []  # every call above is synchronous: nothing waits to be sent

    def close(self) -> str | None:
        return None


class NullTracker:
    """The no-op twin for ranks other than 0."""

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        pass

    def log_params(self, params: dict) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        pass

    def history(self, key: str) -> dict[int, float]:
        return {}

    def tags(self) -> dict[str, str]:
        return {}

    def unsent_metrics(self) -> list[tuple[dict, int, int]]:
        return []

    def close(self) -> str | None:
        return None


class TrackingUnreachable(ConfigError):
    """The configured tracking server did not answer in time; raised before any training starts."""


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast, and in one line, when an HTTP tracking server does not answer: MLflow's own client
    would retry for minutes first. Local stores (sqlite, files) need only a creatable directory."""
    import urllib.error
    import urllib.parse
    import urllib.request

    database = _sqlite_file(uri)
    if database:
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"tracking.uri: cannot create the directory of {redact(uri)} ({exc.strerror})") from None
        return
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    health = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/") + "/health",
                                      "", ""))
    deadline = time.monotonic() + timeout_s
    reason = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health, timeout=max(0.1, deadline - time.monotonic())):
                return
        except urllib.error.HTTPError as exc:  # it answered: a proxy or auth in front of MLflow
            if exc.code in (401, 403, 404):
                return
            reason = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            reason = str(getattr(exc, "reason", exc))
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise TrackingUnreachable(f"tracking.uri: no MLflow server answered at {redact(uri)} within {timeout_s:g} s "
                              f"({reason}); start it, or point tracking.uri / MLFLOW_TRACKING_URI elsewhere")


def start_run(cfg: Config, run_name: str, tags: dict[str, str] | None = None, *, command: str = "pipeline",
              data: PreparedData | None = None, model: ui.ModelPlan | None = None) -> Tracker:
    """Create the run, log the flattened config as params and the resolved YAML as an artifact.
    `command` (`pipeline train`) is its source; `data`, the packed dataset, its dataset input;
    `model`: the model it trains, declared now (`ui.declare_model`), so the UI files the run under
    training runs from its start, not from when (if ever) the model is logged. A classifier's label
    map (`data.label_names`) is logged too (`pipeline.tracking.classifier`)."""
    uri = tracking_uri(cfg.tracking.uri)
    client = client_for(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=_artifact_location(uri),
                                                 tags={ui.EXPERIMENT_KIND_TAG: ui.MODEL_TRAINING})
    else:
        experiment_id = experiment.experiment_id
        ui.mark_model_training(client, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={**ui.source_tags(command), **(tags or {})})
    tracker = Tracker(RunTarget(uri, run.info.run_id))
    tracker.log_params(flatten(cfg))
    tracker.log_text(to_yaml(cfg), "config.yaml")
    if data is not None:
        client.log_inputs(run.info.run_id, datasets=[ui.dataset_input(data, cfg.data.path)])
    if data is not None and data.label_names:
        from pipeline.tracking.classifier import log_label_map

        log_label_map(tracker, data.label_names)
    if model is not None:
        ui.declare_model(client, experiment_id, run.info.run_id, model)
    return tracker


def set_status(target: RunTarget, status: str, stopped_by: str | None = None, stopped_at: int | None = None) -> None:
    """End a run as FINISHED, FAILED or KILLED (`stopped_by` tags who stopped it: asha, interrupt;
    `stopped_at` the last tick it saw: the workers may run on a little while they are torn down)."""
    assert status in STATUSES, status
    client = client_for(target.uri)
    if stopped_by:
        client.set_tag(target.run_id, STOPPED_TAG, stopped_by)
    if stopped_at is not None:
        client.set_tag(target.run_id, STOPPED_AT_TAG, str(stopped_at))
    ui.finish_model(client, target.run_id, status, stopped_by)
    client.set_terminated(target.run_id, status=status)


@contextlib.contextmanager
def run_status(target: RunTarget) -> Iterator[None]:
    """The one owner of a run's end: FINISHED when the block completes, KILLED on Ctrl-C, FAILED on
    any other error, which propagates (a tracking outage while recording it is only logged)."""
    try:
        yield
    except BaseException as error:
        interrupted = isinstance(error, KeyboardInterrupt)
        try:
            set_status(target, "KILLED" if interrupted else "FAILED", "interrupt" if interrupted else None)
        except Exception as outage:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("could not record the end of run %s: %s", target.run_id, outage)
        raise
    set_status(target, "FINISHED")


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """mlflow's fluent API at `uri`, then back. mlflow.set_tracking_uri also exports
    MLFLOW_TRACKING_URI, which every later subprocess (a sweep, a job) would silently inherit."""
    import mlflow

    saved_env, saved_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def log_hf_model(target: RunTarget, model_dir: Path, max_new_tokens: int, chat: bool = False) -> str:
    """Log a saved HF directory with mlflow.transformers so mlflow.pyfunc.load_model can serve it
    (`chat`: it answers {"messages": [...]} through its chat template, OpenAI-style). It is logged as
    a local checkpoint: its files are copied, the model is never loaded here. It fills the model the
    run declared, if it did (one model per run in the UI, PENDING until now)."""
    return log_transformers_model(target, model_dir, "llm/v1/chat" if chat else "text-generation",
                                  {"max_new_tokens": max_new_tokens})


def log_transformers_model(target: RunTarget, model_dir: Path, task: str, model_config: dict) -> str:
    """A saved HF directory logged with mlflow.transformers as the pipeline `task`, `model_config`
    its inference settings (see `log_hf_model`); its model URI."""
    import mlflow
    import transformers

    # pip_requirements is given explicitly: MLflow's inference of them imports torchvision,
    # which is not installed (and not needed) here.
    requirements = [f"transformers=={transformers.__version__}", "torch", "accelerate", "tokenizers"]
    model_id = ui.declared_model(client_for(target.uri), target.run_id)
    with using_tracking_uri(target.uri), _pipeline_classes_resolved(), contextlib.ExitStack() as in_run:
        # A declared model is the run's output already: logged inside the run, MLflow would link it
        # again, which the store refuses (the link is a unique key). Outside it, only its files go up.
        # (The run is opened here, in its own store: before using_tracking_uri, the default one.)
        if not model_id:
            in_run.enter_context(mlflow.start_run(run_id=target.run_id))
        info = mlflow.transformers.log_model(transformers_model=str(model_dir), name="model", task=task,
                                             pip_requirements=requirements, model_config=model_config,
                                             model_id=model_id)
    return info.model_uri


def log_adapter(target: RunTarget, adapter_dir: Path, base_model: str) -> str:
    """Log a peft adapter directory as the run's `adapter/` artifacts, tagged with the base model it
    adapts (`PeftModel.from_pretrained(<base>, <downloaded adapter>)` loads it); its artifact URI."""
    client = client_for(target.uri)
    client.log_artifacts(target.run_id, str(adapter_dir), "adapter")
    client.set_tag(target.run_id, "lora.base_model", base_model)
    return f"runs:/{target.run_id}/adapter"


@contextlib.contextmanager
def _pipeline_classes_resolved():
    """MLflow 3.17 logs a local checkpoint with `check_task(task)[1]["impl"].__name__`, and
    transformers 5 gives a dotted class path (a str) there; resolve it to the class while logging."""
    from transformers import pipelines

    original = pipelines.check_task

    def check_task(task):
        name, targeted, options = original(task)
        return name, {**targeted, "impl": pipelines._resolve_impl(targeted["impl"])}, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def load_pyfunc(model_uri: str, uri: str):
    import mlflow

    with using_tracking_uri(uri):
        return mlflow.pyfunc.load_model(model_uri)

