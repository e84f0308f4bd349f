"""Ray Train + DeepSpeed fine-tuning: the only package where ranks exist."""

from pipeline.train.export import ExportedModel, export_model
from pipeline.train.launch import (
    TrainingFailed,
    TrainOutcome,
    check_against_data,
    fit,
    prepare,
    run_training,
    stored_checkpoint,
)

__all__ = ["ExportedModel", "TrainOutcome", "TrainingFailed", "check_against_data", "export_model", "fit", "prepare",
           "run_training", "stored_checkpoint"]
