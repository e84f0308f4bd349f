"""Job specs (`jobs/*.yaml`): what `pipeline submit` sends to a cluster's Ray Jobs API.

    entrypoint: pipeline train --config configs/tiny.yaml
    runtime_env: {working_dir: ., excludes: [...], env_vars: {MLFLOW_TRACKING_URI: ${MLFLOW_TRACKING_URI}}}
    resources: {entrypoint_num_cpus: 1, entrypoint_num_gpus: 0}
    metadata: {owner: ...}

Whatever a spec says, the upload never includes the virtualenv, Ray's own directory, credential
files, caches, tracking stores or checkpoints (REQUIRED_EXCLUDES), and env values are expanded from
the submitter's environment only when the spec names them: nothing else leaves this machine.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.config import ConfigError, describe_error
from pipeline.runtime import QUIET_RAY_ENV

REQUIRED_EXCLUDES = [
    ".venv/", ".git/", ".ray/", "**/.ray/", ".cache/", "mlruns/", "outputs/", "**/checkpoint_*/",
    ".env", "*.pem", "*.key", ".aws/", ".netrc", ".git-credentials", "**/auth_token", "__pycache__/",
]
_REFERENCE = re.compile(r"\$\{(\w+)\}")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuntimeEnvSpec(_Spec):
    working_dir: str = "."  # relative to the repository root
    excludes: list[str] = []
    env_vars: dict[str, str] = {}  # "${NAME}" takes NAME from the submitter's environment


class ResourceSpec(_Spec):
    entrypoint_num_cpus: float = Field(1, ge=0)
    entrypoint_num_gpus: float = Field(0, ge=0)


class JobSpec(_Spec):
    entrypoint: str
    runtime_env: RuntimeEnvSpec = RuntimeEnvSpec()
    resources: ResourceSpec = ResourceSpec()
    metadata: dict[str, str] = {}

    @field_validator("entrypoint")
    @classmethod
    def _pipeline_command(cls, value: str) -> str:
        if shlex.split(value)[:1] != ["pipeline"]:
            raise ValueError("must be a pipeline command, e.g. 'pipeline train --config configs/tiny.yaml'")
        return value


def load_job_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> JobSpec:
    """Read and validate a spec; `overrides` (dotted config overrides) are appended to its entrypoint."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"job spec not found: {path}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"job spec {path} must hold a mapping at the top level")
    if overrides and isinstance(raw.get("entrypoint"), str):
        raw["entrypoint"] += " " + " ".join(shlex.quote(item) for item in overrides)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"job spec {path}: " + "; ".join(describe_error(e) for e in exc.errors())) from None


def config_paths(spec: JobSpec) -> list[str]:
    """The config files the entrypoint names (`--config X`, `-c X`)."""
    words = shlex.split(spec.entrypoint)
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word in ("--config", "-c")]


def runtime_env_dict(spec: JobSpec, repo_root: Path, environ: dict[str, str] | None = None) -> dict:
    """The runtime_env for JobSubmissionClient: absolute working_dir, enforced excludes, expanded env."""
    environ = os.environ if environ is None else environ
    env_vars = {}
    for name, value in spec.runtime_env.env_vars.items():
        missing = [ref for ref in _REFERENCE.findall(value) if ref not in environ]
        if missing:
            continue  # unset on this machine: the cluster's own value (or default) applies
        env_vars[name] = _REFERENCE.sub(lambda match: environ[match.group(1)], value)
    excludes = list(dict.fromkeys([*spec.runtime_env.excludes, *REQUIRED_EXCLUDES]))
    # A job's runtime_env replaces the one `ray.init` asks for inside the job, so the logging settings
    # that `pipeline.runtime` gives local runs (no duplicated worker lines) travel with the job.
    return {"working_dir": str((repo_root / spec.runtime_env.working_dir).resolve()), "excludes": excludes,
            "env_vars": {**QUIET_RAY_ENV, **env_vars}}
