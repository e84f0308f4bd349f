"""Ray Train + DeepSpeed fine-tuning: the only package where ranks exist."""

from pipeline.train.checkpoints import CheckpointError, choose_checkpoint, drop_optimizer_state
from pipeline.train.export import ExportedModel, export_in_task, export_model
from pipeline.train.launch import (
    TrainingFailed,
    TrainOutcome,
    check_against_data,
    fit,
    fit_in_process,
    prepare,
    run_training,
    stored_checkpoint,
)
from pipeline.train.local import runs_in_process
from pipeline.train.resources import describe, runs_that_fit, worker_bundle

__all__ = ["CheckpointError", "ExportedModel", "TrainOutcome", "TrainingFailed", "check_against_data", "choose_checkpoint",
           "describe", "drop_optimizer_state", "export_in_task", "export_model", "fit", "fit_in_process", "prepare",
           "run_training", "runs_in_process", "runs_that_fit", "stored_checkpoint", "worker_bundle"]
