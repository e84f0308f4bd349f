"""The typed configuration: one frozen pydantic tree, loaded from YAML plus dotted overrides.

Every entrypoint turns (YAML file, ["train.lr=3e-4", ...]) into a `Config` before Ray starts,
so a typo or a bad value fails in one line that names the field, not deep inside a worker.
Each section lives in a module of its own; a field's meaning is the string under it, from which
`pipeline.config.reference` generates the README's config reference and the CLI's help.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import ValidationError, model_validator

from pipeline.config.data import CLASSIFICATION_FORMATS, EXAMPLE_FORMATS, TEXT_FORMATS, DataConfig, FieldNames, SplitConfig
from pipeline.config.model import TASKS, LoraConfig, ModelConfig
from pipeline.config.noise import KernelConfig, NoiseConfig
from pipeline.config.section import Section
from pipeline.config.services import RayConfig, StorageConfig, TrackingConfig
from pipeline.config.sweep import EVAL_METRICS, ConfirmConfig, SchedulerConfig, SearchDimension, SweepConfig
from pipeline.config.train import TrainConfig, ZeroConfig
from pipeline.raw_config import ConfigError, apply_overrides, read_yaml

__all__ = [
    "CLASSIFICATION_FORMATS", "EVAL_METRICS", "EXAMPLE_FORMATS", "TASKS", "TEXT_FORMATS", "Config", "ConfigError",
    "ConfirmConfig", "DataConfig", "FieldNames",
    "KernelConfig", "LoraConfig", "ModelConfig", "NoiseConfig", "RayConfig", "SchedulerConfig", "SearchDimension",
    "Section", "SplitConfig", "StorageConfig", "SweepConfig", "TrackingConfig", "TrainConfig", "ZeroConfig",
    "describe_error", "is_uri", "load_config", "to_yaml",
]

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(path: str | None) -> bool:
    """`s3://bucket/key`, `gs://...`: a location in object storage rather than a local path."""
    return bool(path) and bool(_URI.match(path))


class Config(Section):
    """The whole configuration: one YAML file (with `extends:`) plus `section.field=value` overrides."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    noise: NoiseConfig = NoiseConfig()
    kernel: KernelConfig = KernelConfig()
    sweep: SweepConfig = SweepConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check_task_fits_the_data(self) -> Config:
        wanted = CLASSIFICATION_FORMATS.get(self.data.format, "causal_lm")
        if self.model.task != wanted:
            fitting = [f for f, task in CLASSIFICATION_FORMATS.items() if task == self.model.task] or ["a text or example format"]
            raise ValueError(f"data.format: '{self.data.format}' is for model.task '{wanted}', and model.task is "
                             f"'{self.model.task}'; for '{self.model.task}' use {' or '.join(fitting)}")
        return self

    def with_overrides(self, overrides: list[str]) -> Config:
        return _validate(apply_overrides(self.model_dump(mode="python"), overrides))


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML file, apply `a.b=value` overrides, validate. Raises ConfigError naming the field."""
    return _validate(apply_overrides(read_yaml(Path(path)), overrides or []))


def _validate(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("config error: " + "; ".join(describe_error(e) for e in exc.errors())) from None


def describe_error(error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and not error["loc"] and re.match(r"[\w.]+: ", message):
        return message  # a check across sections names its field in full ("data.format: ...")
    # A cross-field check names its field first ("grad_accum: ..."): attach it to the section's path.
    named = re.match(r"(\w+): ", message)
    if error["type"] == "value_error" and named:
        return f"{field}.{named.group(1)}: {message[named.end():]}"
    if error["type"] == "extra_forbidden":
        return f"{field}: unknown field"
    if error["type"] == "missing":
        return f"{field}: required field is missing"
    return f"{field}: {message} (got {error.get('input')!r})"


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
