"""Connecting to Ray: a local instance bound to 127.0.0.1 by default, or an existing cluster."""

from __future__ import annotations

import logging
import os

from pipeline.config import RayConfig

log = logging.getLogger(__name__)

# Read by Ray when it is imported, so they are set before: rank-0 progress lines must not be folded
# away as "repeated" nor drowned by per-operator progress bars in a log file.
# Ray Train's print patch would also echo every worker line a second time.
QUIET_RAY_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                 "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
for _name, _value in QUIET_RAY_ENV.items():
    os.environ.setdefault(_name, _value)


def ensure_ray(cfg: RayConfig) -> None:
    """Start (or join) Ray once per process. The dashboard stays on: Tune over Train needs it to
    release finished trials' placement groups."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": dict(QUIET_RAY_ENV)}
    if address:
        # Inside a submitted Ray job these variables already come with the job's runtime_env (pipeline
        # submit adds them), and Ray refuses a driver runtime_env that repeats its keys.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=address, runtime_env=None if in_job else runtime_env)
        return
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             logging_level=logging.WARNING, runtime_env=runtime_env)
    log.info("started a local Ray instance (dashboard on 127.0.0.1)")
