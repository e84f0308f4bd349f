"""What the MLflow UI (3.17) reads to show a pipeline run as model training, not as a GenAI app.

Found in the UI's own bundle (mlflow/server/js/build/static/js), since nothing in the Python API
says it:
- The view (GenAI or Model training) is the sidebar's `workflowType`: the URL's
  `?workflowType=machine_learning`, else the browser's saved choice, else GenAI. The experiment tag
  `mlflow.experimentKind` picks it only where that switch is off (older 3.x UIs): it is set anyway,
  and `run_page_url` gives links that open in Model training.
- The run table's Dataset column and the run page's Datasets are the run's `inputs.dataset_inputs`;
  Source is the `mlflow.source.name` tag (its last `/` part); Models are the logged models whose
  `source_run_id` is the run (`logged-models/search`).
- A run with no `outputs.model_outputs` is filed under "Evaluation runs", one with them under
  "Training runs". So every run that trains declares its model when it starts (PENDING), linked as
  its output, and a sweep's parent gets its trials' models as outputs.
"""

from __future__ import annotations

import getpass
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.data import PreparedData

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the UI's ExperimentKind.CUSTOM_MODEL_DEVELOPMENT
MODEL_TAG = "pipeline.model_id"  # on a run: the logged model it declared
CHECKPOINTS_TAG = "pipeline.checkpoints"  # on a trial's model: its Train run directory (no MLflow artifacts)
TRAINING_VIEW = "workflowType=machine_learning"


def mark_model_training(client, experiment) -> None:
    """Tag an experiment (one from before this tag, or made elsewhere) as model training, unless
    someone already chose its kind."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def source_tags(command: str) -> dict[str, str]:
    """The tags MLflow's own fluent runs get from their context; `create_run` sets none of them."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (some containers)
        user = "unknown"
    return {"mlflow.source.name": command, "mlflow.source.type": "LOCAL", "mlflow.user": user}


def dataset_input(data: PreparedData, name: str):
    """The packed dataset as one input: its fingerprint is the digest (the cache key: same data, same
    digest), its cache entry the source, the split sizes the profile (the UI lists its keys)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    scheme = urllib.parse.urlsplit(data.root).scheme
    source_type = scheme if scheme == "s3" else "local"  # the two the UI shows a location for
    profile = {"seq_len": data.seq_len}
    for split, stats in data.stats.items():
        profile |= {f"{split}_{key}": stats[key] for key in ("documents", "tokens", "blocks") if key in stats}
    dataset = Dataset(name=name, digest=data.fingerprint, source_type=source_type,
                      source=json.dumps({"uri": data.root}), profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


@dataclass(frozen=True)
class ModelPlan:
    """The model a new run trains, declared when the run starts (see `declare_model`)."""

    name: str = "model"  # the name mlflow.transformers.log_model gives it too
    tags: dict[str, str] = field(default_factory=dict)
    also_output_of: str | None = None  # a sweep's parent run: it lists its trials' models


def declare_model(client, experiment_id: str, run_id: str, plan: ModelPlan) -> str:
    """A PENDING logged model for what the run trains, linked as the run's output (and the
    parent's) and named in the run's MODEL_TAG. `log_hf_model` fills it in; `finish_model` ends it
    with the run."""
    from mlflow.entities import LoggedModelOutput

    model = client.create_logged_model(experiment_id, name=plan.name, source_run_id=run_id, tags=plan.tags or None)
    for output_of in filter(None, (run_id, plan.also_output_of)):
        client.log_outputs(output_of, [LoggedModelOutput(model.model_id, step=0)])
    client.set_tag(run_id, MODEL_TAG, model.model_id)
    return model.model_id


def declared_model(client, run_id: str) -> str | None:
    return client.get_run(run_id).data.tags.get(MODEL_TAG)


def finish_model(client, run_id: str, status: str, stopped_by: str | None) -> None:
    """End the run's declared model if it is still PENDING: READY when the run trained (to its end,
    or until ASHA stopped it: its checkpoints stay), FAILED when it failed. An interrupted run
    leaves it PENDING, since `pipeline tune --resume` continues it."""
    model_id = declared_model(client, run_id)
    if model_id is None or (status == "KILLED" and stopped_by != "asha"):
        return
    if str(client.get_logged_model(model_id).status) == "PENDING":
        client.finalize_logged_model(model_id, "FAILED" if status == "FAILED" else "READY")


def run_page_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the tracking server's UI, opened in the Model training view; None for a
    local store (its UI is wherever `mlflow ui` is started)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return None
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"

