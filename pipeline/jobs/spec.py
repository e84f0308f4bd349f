"""Job specs (`jobs/*.yaml`): what `pipeline submit` sends to a cluster's Ray Jobs API.

    entrypoint: pipeline train --config configs/tiny.yaml
    runtime_env: {working_dir: ., excludes: [...], env_vars: {MLFLOW_TRACKING_URI: ${MLFLOW_TRACKING_URI}}}
    resources: {entrypoint_num_cpus: 1, entrypoint_num_gpus: 0}
    metadata: {owner: ...}

Whatever a spec says, the upload never includes the virtualenv, Ray's own directory, credential
files, caches, tracking stores or checkpoints (REQUIRED_EXCLUDES), and env values are expanded from
the submitter's environment only when the spec names them: nothing else leaves this machine. A
reference to an unset variable leaves its entry out (the cluster's own value applies), except
PIPELINE_WORK_DIR: without it a job's relative caches and outputs land in a temporary directory of
one node, so a spec that asks for it and does not get it is refused.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from pipeline.config import ConfigError, describe_error
from pipeline.runtime import QUIET_RAY_ENV

REQUIRED_EXCLUDES = [
    ".venv/", ".git/", ".ray/", "**/.ray/", ".cache/", "mlruns/", "outputs/", "**/checkpoint_*/",
    ".env", "*.pem", "*.key", ".aws/", ".netrc", ".git-credentials", "**/auth_token", "__pycache__/",
]
_REFERENCE = re.compile(r"\$\{(\w+)\}")
WORK_DIR = "PIPELINE_WORK_DIR"


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
    _source: str = PrivateAttr("the job spec")  # how messages name it: its path, set by load_job_spec

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
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"job spec {path}: " + "; ".join(describe_error(e) for e in exc.errors())) from None
    spec._source = f"job spec {path}"
    return spec


def config_paths(spec: JobSpec) -> list[str]:
    """The config files the entrypoint names (`--config X`, `-c X`)."""
    words = shlex.split(spec.entrypoint)
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word in ("--config", "-c")]


def runtime_env_dict(spec: JobSpec, repo_root: Path, environ: dict[str, str] | None = None) -> dict:
    """The runtime_env for JobSubmissionClient: absolute working_dir, enforced excludes, expanded env."""
    environ = os.environ if environ is None else environ
    env_vars = {}
    for name, value in spec.runtime_env.env_vars.items():
        references = _REFERENCE.findall(value)
        missing = [ref for ref in references if ref not in environ]
        if WORK_DIR in references and not environ.get(WORK_DIR):  # unset or empty: the same fallback
            raise ConfigError(
                f"{spec._source}: env_vars.{name} takes ${{{WORK_DIR}}}, which is not set here: set {WORK_DIR} "
                f"to storage every node shares, or use URIs (s3://, gs://) for data.cache_dir, train.output_dir "
                f"and model.cache_dir and drop {WORK_DIR} from the spec")
        if missing:
            continue  # unset on this machine: the cluster's own value (or default) applies
        env_vars[name] = _REFERENCE.sub(lambda match: environ[match.group(1)], value)
    excludes = list(dict.fromkeys([*spec.runtime_env.excludes, *REQUIRED_EXCLUDES]))
    # A job's runtime_env replaces the one `ray.init` asks for inside the job, so the logging settings
    # that `pipeline.runtime.ensure_ray` gives local runs (no duplicated worker lines) travel with the job.
    return {"working_dir": str((repo_root / spec.runtime_env.working_dir).resolve()), "excludes": excludes,
            "env_vars": {**QUIET_RAY_ENV, **env_vars}}
