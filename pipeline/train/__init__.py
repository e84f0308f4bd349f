"""Ray Train + DeepSpeed fine-tuning: the only package where ranks exist."""

from pipeline.train.checkpoints import CheckpointError, choose_checkpoint
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

__all__ = ["CheckpointError", "ExportedModel", "TrainOutcome", "TrainingFailed", "check_against_data", "choose_checkpoint",
           "export_model", "fit", "prepare", "run_training", "stored_checkpoint"]
