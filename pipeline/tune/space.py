"""The search space: config paths -> Ray Tune domains, and a trial's parameters -> config overrides.

A dimension with `with_zero` becomes two searched parameters: `<path>` (its range) and a gate
`<path>@zero` uniform in [0, 1); the value is exactly 0 when the gate is below ZERO_SHARE. The first
trial pins the gate to 0, so every default sweep contains a σ = 0 baseline; later trials land on 0
about ZERO_SHARE of the time under random search, and Optuna's TPE moves the gate wherever the
eval loss is better. (Optuna cannot take 0 inside a log range, hence the separate gate.)
"""

from __future__ import annotations

import math

from pipeline.config import Config, ConfigError, SearchDimension

ZERO_SUFFIX = "@zero"
ZERO_SHARE = 0.2
# Paths a trial may not change: the sweep prepares one packed dataset and one model for all trials.
# The LoRA rank and scale are the exception: the adapters differ, the base model is the same.
FIXED_PREFIXES = ("model.", "data.", "ray.", "sweep.", "tracking.")
SEARCHABLE_MODEL_PATHS = ("model.lora.r", "model.lora.alpha", "model.lora.dropout")


def effective_space(cfg: Config) -> dict[str, SearchDimension]:
    """The configured space, or the default: lr around train.lr, and the noise of each site noise.site
    names, 0 included: σ log-uniform in [1e-3, 0.3] for the norms, NEFTune's α in [1, 15] (the
    paper's 5, 10, 15 and below) for the embedding."""
    if cfg.sweep.space:
        return dict(cfg.sweep.space)
    lr = cfg.train.lr
    space = {}
    if cfg.noise.site in ("norm", "both"):
        space["noise.sigma"] = SearchDimension(type="loguniform", low=1e-3, high=0.3, with_zero=True)
    if cfg.noise.site in ("embedding", "both"):
        space["noise.neftune_alpha"] = SearchDimension(type="loguniform", low=1.0, high=15.0, with_zero=True)
    return {**space, "train.lr": SearchDimension(type="loguniform", low=lr / 10, high=lr * 10)}


def check_space(cfg: Config) -> None:
    """Every searched path must exist and be allowed to vary; every sampled value must validate."""
    for path, dimension in effective_space(cfg).items():
        if path.startswith("model.lora.") and cfg.model.lora is None:
            raise ConfigError(f"sweep.space.{path}: the model trains without LoRA; set model.lora to search it")
        if path.startswith(FIXED_PREFIXES) and path not in SEARCHABLE_MODEL_PATHS:
            raise ConfigError(f"sweep.space.{path}: cannot be searched (one dataset, model and store per sweep)")
        for value in _corner_values(dimension):
            try:
                cfg.with_overrides([f"{path}={value!r}" if isinstance(value, str) else f"{path}={value}"])
            except ConfigError as error:
                raise ConfigError(f"sweep.space.{path}: value {value!r} is invalid: {error}") from None


def _corner_values(dimension: SearchDimension) -> list:
    if dimension.type == "choice":
        return list(dimension.values)
    return [dimension.low, dimension.high] + ([0.0] if dimension.with_zero else [])


def tune_space(space: dict[str, SearchDimension]) -> tuple[dict, list[dict]]:
    """(param_space for tune.Tuner, points_to_evaluate): the first point is the centre, with zeros on."""
    from ray import tune

    param_space, first_point = {}, {}
    for path, dimension in space.items():
        if dimension.type == "choice":
            param_space[path] = tune.choice(list(dimension.values))
            first_point[path] = dimension.values[0]
        elif dimension.type == "loguniform":
            param_space[path] = tune.loguniform(dimension.low, dimension.high)
            first_point[path] = math.sqrt(dimension.low * dimension.high)
        else:
            param_space[path] = tune.uniform(dimension.low, dimension.high)
            first_point[path] = (dimension.low + dimension.high) / 2
        if dimension.with_zero:
            param_space[path + ZERO_SUFFIX] = tune.uniform(0.0, 1.0)
            first_point[path + ZERO_SUFFIX] = 0.0
    return param_space, [first_point]


def trial_values(params: dict) -> dict:
    """A trial's sampled parameters as config values: a `<path>@zero` gate below ZERO_SHARE makes `<path>` 0."""
    values = {path: value for path, value in params.items() if not path.endswith(ZERO_SUFFIX)}
    for path, gate in params.items():
        if path.endswith(ZERO_SUFFIX) and gate < ZERO_SHARE:
            values[path.removesuffix(ZERO_SUFFIX)] = 0.0
    return values


def trial_overrides(params: dict) -> list[str]:
    return [f"{path}={value}" for path, value in sorted(trial_values(params).items())]
