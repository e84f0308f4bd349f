"""The `sweep:` section of the config (`pipeline tune`): the search space, ASHA, and the paired
confirmation of the best configuration. `pipeline.config` imports it into the whole tree."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    # The same rules as pipeline.config's sections (that module imports this one, so this one cannot
    # import its base): an unknown key is an error naming it; frozen.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchDimension(Section):
    """How one config path is searched. `with_zero` also tries exactly 0 (e.g. σ = 0: no noise)."""

    type: Literal["loguniform", "uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None
    with_zero: bool = False

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


class SchedulerConfig(Section):
    """ASHA on eval loss; rungs are counted in ticks and end at train.max_ticks."""

    grace_period: int = Field(2, ge=1)
    reduction_factor: int = Field(2, ge=2)


class ConfirmConfig(Section):
    """After the search, the chosen configuration is re-run with `seeds` fresh seeds, each paired
    with a σ = 0 twin on the same seeds: the sweep's verdict is the paired difference and its interval."""

    # Confirmation seeds (every one a run per arm). 0 turns confirmation off; 1 is refused, since
    # one pair gives a difference but no interval.
    seeds: int = Field(3, ge=0)
    # Skip the search and confirm the config as given (its own noise and lr).
    only: bool = False

    @model_validator(mode="after")
    def _check_seeds(self) -> ConfirmConfig:
        if self.seeds == 1:
            raise ValueError("seeds: 1 seed gives one pair and no interval; use 2 or more, or 0 to skip confirmation")
        if self.only and self.seeds == 0:
            raise ValueError("only: confirmation alone needs seeds >= 2 (it is 0)")
        return self


class SweepConfig(Section):
    """`pipeline tune`: Ray Tune over any config paths (default: noise.sigma with 0, and train.lr)."""

    name: str | None = None  # default: <experiment>-sweep-<time>
    space: dict[str, SearchDimension] = {}  # empty: the default space over noise.sigma and train.lr
    num_samples: int = Field(8, ge=1)
    # Trials at once; each needs its train.num_workers workers. 0: as many as the cluster fits (or
    # can scale to); more than fit is refused.
    max_concurrent_trials: int = Field(1, ge=0)
    search: Literal["optuna", "random"] = "optuna"
    seed: int = 0
    scheduler: SchedulerConfig = SchedulerConfig()
    confirm: ConfirmConfig = ConfirmConfig()
    register_model: str | None = None  # Model Registry name; default <experiment>-best
    storage_dir: str = "outputs/sweeps"
