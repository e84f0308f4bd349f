"""MLflow for the classification tasks: the label map a run trains with, and the classifier it exports.

The label map (the classes in id order, `PreparedData.label_names`) goes into the run as params
`labels.count` and `labels.<id>` (searchable, shown beside the config) and as the artifact
`labels.json` (the `id2label`/`label2id` maps a Hugging Face config holds). The model is logged as a
transformers pipeline whose pyfunc predicts class names, not ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.tracking.store import RunTarget, RunTracker, log_transformers_model

LABELS_FILE = "labels.json"
PIPELINE_TASKS = {"sequence_classification": "text-classification", "token_classification": "token-classification"}
# A token-classification pipeline leaves "O" tokens out by default, and MLflow's pyfunc then fails on a
# text with no entity at all (its output parser reads the first of no entities): every token's tag is
# returned instead, one per sub-word token, comma-separated.
PIPELINE_SETTINGS = {"sequence_classification": None, "token_classification": {"ignore_labels": []}}


def label_params(label_names: tuple[str, ...]) -> dict[str, str | int]:
    return {"labels.count": len(label_names), **{f"labels.{index}": name for index, name in enumerate(label_names)}}


def log_label_map(tracker: RunTracker, label_names: tuple[str, ...]) -> None:
    tracker.log_params(label_params(label_names))
    maps = {"id2label": dict(enumerate(label_names)), "label2id": {name: i for i, name in enumerate(label_names)}}
    tracker.log_text(json.dumps(maps, indent=1, ensure_ascii=False) + "\n", LABELS_FILE)


def log_classifier(target: RunTarget, model_dir: Path, task: str) -> str:
    """An exported classifier (its config naming the classes) as the run's model: a `text-classification`
    pipeline for `sequence_classification` (pyfunc: a table of `label` and `score` per text), a
    `token-classification` one for `token_classification` (pyfunc: each text's tags); its model URI."""
    return log_transformers_model(target, model_dir, PIPELINE_TASKS[task], PIPELINE_SETTINGS[task])
