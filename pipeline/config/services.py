"""The `tracking:`, `storage:` and `ray:` sections: the services a run talks to."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.section import Section


class TrackingConfig(Section):
    """MLflow: the store, the experiment and run, the logged model and sample generations, timeouts."""

    uri: str | None = None
    """The MLflow store; `MLFLOW_TRACKING_URI` in the environment overrides it. None: sqlite under
    `./mlruns`."""
    experiment: str = "finetune"
    """The MLflow experiment."""
    run_name: str | None = None
    """The MLflow run's name; none: timestamped."""
    log_model: bool = True
    """Log the final model with `mlflow.transformers` (a `chat` run's model answers chat messages)."""
    max_new_tokens: int = Field(32, ge=1)
    """Tokens a generation may add: the sample generations, and the logged model's default."""
    sample_prompts: int = Field(3, ge=0, le=8)
    """Example formats: at every evaluation, this many held-out prompts are answered greedily and logged
    as the table `samples/generations.json` (tick, prompt, reference, generation); 0: off."""
    connect_timeout_s: float = Field(10.0, gt=0)
    """A tracking server that does not answer in this many seconds fails the run before Ray starts."""
    flush_timeout_s: float = Field(120.0, ge=0)
    """After training, how long metrics buffered during a tracking outage may take to reach the server
    before they are written to a file beside the checkpoints instead."""


class StorageConfig(Section):
    """Object storage (`s3://`, `gs://` locations). Credentials are never config: the standard chains
    (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_PROFILE` / instance roles;
    `GOOGLE_APPLICATION_CREDENTIALS` for gs) on each node."""

    endpoint_url: str | None = None
    """An S3-compatible store (MinIO, Ceph, R2, ...); none: `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`,
    or AWS itself."""
    region: str | None = None
    """None: `AWS_DEFAULT_REGION`, `AWS_REGION`, or `us-east-1`."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Seconds to connect to the store. The check before Ray starts makes one attempt of at most 10 s."""
    request_timeout_s: float = Field(30.0, gt=0)
    """Seconds a request may take."""
    max_attempts: int = Field(3, ge=1)
    """Attempts per request, with the SDK's backoff: with the timeouts, bounds every wait on storage."""


class RayConfig(Section):
    """The Ray cluster: an existing one, or a local Ray started for the run."""

    address: str | None = None
    """An existing cluster (`RAY_ADDRESS` also works): its GCS (`HOST:6379`, `auto`) or its job API
    (`http://HOST:8265`, joined through the GCS it names; where that is unreachable, one line says to
    submit a job instead); none: a local Ray with the dashboard on 127.0.0.1. Every node must see the
    caches and `train.output_dir`: single-node, or shared storage (jobs set `PIPELINE_WORK_DIR`, see
    `jobs/README.md`)."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of the local Ray; none: all cores."""
    resources: dict[str, float] = {}
    """Custom resources the local Ray declares; Ray schedules them without hardware (`{fake_gpu: 2}`
    tests packing without GPUs)."""
