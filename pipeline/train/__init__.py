"""Ray Train + DeepSpeed fine-tuning: the only package where ranks exist."""

from pipeline.train.launch import TrainingFailed, TrainOutcome, prepare, run_training

__all__ = ["TrainOutcome", "TrainingFailed", "prepare", "run_training"]
