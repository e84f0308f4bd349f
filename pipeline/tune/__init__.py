"""Ray Tune sweeps over noise σ and the learning rate (or any config paths), recorded in MLflow as a
parent run with one nested run per trial."""

from pipeline.tune.sweep import SweepOutcome, run_sweep, sweep_config

__all__ = ["SweepOutcome", "run_sweep", "sweep_config"]
