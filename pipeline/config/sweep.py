"""The `sweep:` section of the config (`pipeline tune`): the search space, ASHA, and the paired
confirmation of the best configuration."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.section import Section


class SearchDimension(Section):
    """How one config path is searched."""

    type: Literal["loguniform", "uniform", "choice"]
    """How values are drawn: log-uniform or uniform in [`low`, `high`], or one of `values`."""
    low: float | None = None
    """The range's lower end (`loguniform`: > 0)."""
    high: float | None = None
    """The range's upper end, above `low`."""
    values: list[Any] | None = None
    """For `choice`: the options."""
    with_zero: bool = False
    """Also try exactly 0 (e.g. σ = 0: no noise); the first trial does."""

    @model_validator(mode="after")
    def _check_bounds(self) -> SearchDimension:
        if self.type == "choice":
            if not self.values:
                raise ValueError("values must list at least one option for type 'choice'")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"low < high must be given for type '{self.type}'")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("low must be > 0 for type 'loguniform' (use with_zero to also try 0)")
        return self


# A metric's direction from its name: smaller losses are better, larger scores.
MINIMISED = ("loss", "perplexity")
MAXIMISED = ("accuracy", "f1", "precision", "recall")
# What each model.task's evaluation reports, so a sweep on another task's metric stops before it starts.
EVAL_METRICS = {"causal_lm": ("eval_loss", "eval_perplexity"),
                "sequence_classification": ("eval_loss", "eval_accuracy", "eval_f1"),
                "token_classification": ("eval_loss", "eval_precision", "eval_recall", "eval_f1", "eval_accuracy")}


def mode_of(metric: str) -> Literal["min", "max"] | None:
    """min for a loss or perplexity, max for an accuracy, F1, precision or recall; None: not known by name."""
    last = metric.rsplit("_", 1)[-1].lower()
    if last in MINIMISED:
        return "min"
    return "max" if last in MAXIMISED else None


class SchedulerConfig(Section):
    """ASHA on `sweep.metric`; rungs are counted in ticks and end at `train.max_ticks`. Needs
    `train.eval_every`."""

    grace_period: int = Field(2, ge=1)
    """Ticks every trial runs before ASHA may stop it."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA keeps 1 in this many trials at each rung."""


class ConfirmConfig(Section):
    """After the search, the chosen configuration is re-run with `seeds` fresh seeds, each paired
    with a σ = 0 twin on the same seeds: the sweep's verdict is the paired difference and its interval."""

    seeds: int = Field(3, ge=0)
    """New seeds the confirmed config and its σ = 0 twin (and a NEFTune twin when the search had
    NEFTune) run on, paired by seed (see "Reading a sweep's verdict"); every one a run per arm. 0 turns
    confirmation off; 1 is refused, since one pair gives a difference but no interval."""
    only: bool = False
    """Skip the search and confirm the config as given (its own σ and lr) against its twins; needs
    noise on and `seeds` >= 2."""

    @model_validator(mode="after")
    def _check_seeds(self) -> ConfirmConfig:
        if self.seeds == 1:
            raise ValueError("seeds: 1 seed gives one pair and no interval; use 2 or more, or 0 to skip confirmation")
        if self.only and self.seeds == 0:
            raise ValueError("only: confirmation alone needs seeds >= 2 (it is 0)")
        return self


class SweepConfig(Section):
    """`pipeline tune`: Ray Tune over any config paths (default: noise with a zero, and train.lr), then
    the paired confirmation of the best configuration."""

    name: str | None = None
    """The sweep's name and directory under `storage_dir`; none: `<experiment>-sweep-<time>`."""
    metric: str = "eval_loss"
    """What the sweep optimises: ASHA and the searcher compare trials on it, the best trial has the
    best final value, and the confirmation pairs it by seed. `eval_loss`, `eval_perplexity`; with the
    classification tasks also `eval_accuracy`, `eval_f1` (`token_classification`: `eval_precision`,
    `eval_recall` too); or any other metric every evaluation reports (then give `mode`)."""
    mode: Literal["min", "max"] | None = None
    """Whether a smaller (`min`) or larger (`max`) `metric` is better. None: from its name, `min` for a
    loss or perplexity, `max` for an accuracy, F1, precision or recall."""
    space: dict[str, SearchDimension] = {}
    """The searched config paths. `model.*` (but `model.lora.r`, `.alpha`, `.dropout`), `data.*`,
    `ray.*` and `tracking.*` cannot vary. Empty: lr in [lr/10, 10·lr] log-uniform, plus per
    `noise.site`: σ in [1e-3, 0.3] log-uniform and σ = 0 (`norm`), NEFTune α in [1, 15] log-uniform and
    α = 0 (`embedding`)."""
    num_samples: int = Field(8, ge=1)
    """Search trials."""
    max_concurrent_trials: int = Field(1, ge=0)
    """Trials at once, each with its `train.num_workers` workers; 0: as many as the cluster fits (or can
    scale to). More than fit is refused before the sweep starts."""
    search: Literal["optuna", "random"] = "optuna"
    """Optuna TPE, or random search (also the fallback when optuna is missing)."""
    seed: int = 0
    """The search's seed."""
    scheduler: SchedulerConfig = SchedulerConfig()
    confirm: ConfirmConfig = ConfirmConfig()
    register_model: str | None = None
    """The Model Registry name of the best model (the best search trial's; see "Sweeps"); none:
    `<experiment>-best`."""
    storage_dir: str = "outputs/sweeps"
    """Where Tune keeps the sweep's state (local or a URI)."""

    @model_validator(mode="after")
    def _check_mode(self) -> SweepConfig:
        if self.mode is None and mode_of(self.metric) is None:
            raise ValueError(f"mode: say whether a smaller (min) or larger (max) '{self.metric}' is better; only "
                             f"losses, perplexities, accuracies, F1, precision and recall are known by name")
        return self

    @property
    def metric_mode(self) -> Literal["min", "max"]:
        """`mode`, or the one the metric's name implies."""
        return self.mode or mode_of(self.metric)
