"""Ray Train + DeepSpeed fine-tuning: the only package where ranks exist."""

from pipeline.train.launch import TrainOutcome, prepare, run_training

__all__ = ["TrainOutcome", "prepare", "run_training"]
