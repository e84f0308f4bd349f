"""Running on Ray clusters: job specs (`jobs/*.yaml`), `pipeline submit`/`jobs`, and a local
development cluster (`pipeline cluster`)."""

from pipeline.jobs.cluster import ClusterError
from pipeline.jobs.submit import JobError

__all__ = ["ClusterError", "JobError"]
