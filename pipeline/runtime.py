"""Connecting to Ray: a local instance bound to 127.0.0.1 by default, or an existing cluster."""

from __future__ import annotations

import contextlib
import logging
import os

from pipeline.config import ConfigError, RayConfig
from pipeline.ray_address import AddressError, gcs_address_of, is_job_api, reachable, use_token_auth

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_NODE_IP_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's processes take the loopback address

# Read by Ray when it is imported: rank-0 progress lines must not be folded away as "repeated" nor
# drowned by per-operator progress bars in a log file. Ray Train's print patch would also echo every
# worker line a second time. Ray's own processes get them through the runtime_env (`ensure_ray`).
QUIET_RAY_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                 "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def quiet_ray_environment() -> None:
    """Set QUIET_RAY_ENV in this process where the user has not, before it imports Ray. Called by each
    entry point (the CLI's `main`, the test session, the benchmarks) and by `ensure_ray` for a library caller; a
    caller that imported Ray before still gets them in Ray's workers."""
    for name, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(name, value)

# Ray Train's controller polls its workers every 2 s and starts a preemption watcher (a process of
# its own) per run. On one machine there is no node to drain, and the polling is most of the wait
# between a run's last tick and its end: a tiny run takes 44 s instead of 66 s here. Only for Ray
# instances on this machine (a local one, the dev cluster); a real cluster keeps Ray's defaults.
ONE_MACHINE_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray(cfg: RayConfig, dashboard: bool = True) -> None:
    """Start (or join) Ray once per process. The dashboard stays on for training: Tune over Train
    needs it to release finished trials' placement groups. `pipeline prepare` alone goes without it
    (seconds less start-up on a small machine)."""
    quiet_ray_environment()
    import ray

    if ray.is_initialized():
        return
    source, address = ("ray.address", cfg.address) if cfg.address else ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))
    runtime_env = {"env_vars": dict(QUIET_RAY_ENV)}
    if address:
        # Inside a submitted Ray job these variables already come with the job's runtime_env (pipeline
        # submit adds them), and Ray refuses a driver runtime_env that repeats its keys. Its auth mode
        # comes with the node's environment too.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        if not in_job:
            use_token_auth()  # an explicit address never turns token mode on in Ray 2.60; its clusters require it
        gcs = address_to_join(address, source)
        ray.init(address=gcs, runtime_env=None if in_job else runtime_env)
        log.info("joined the Ray cluster at %s%s", gcs, f" (the GCS of the job API {address})" if gcs != address else "")
        return
    for name, value in ONE_MACHINE_RAY_ENV.items():  # the driver reads some of them too
        os.environ.setdefault(name, value)
    runtime_env["env_vars"].update({name: os.environ[name] for name in ONE_MACHINE_RAY_ENV})
    with _loopback_only():
        ray.init(num_cpus=cfg.num_cpus, resources=cfg.resources or None, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 _node_ip_address=LOOPBACK, logging_level=logging.WARNING, runtime_env=runtime_env)
    log.info("started a local Ray instance bound to 127.0.0.1")


def address_to_join(address: str, source: str) -> str:
    """What `ray.init` joins for the address the user set in `source` (RAY_ADDRESS or ray.address):
    a GCS address as it is, the job API (`http://HOST:8265`, which `pipeline submit|jobs` take)
    through the GCS it names. Where that GCS cannot be found or reached (a laptop outside the
    cluster's network), one line says what to do instead of Ray's traceback."""
    if is_job_api(address):
        try:
            gcs = gcs_address_of(address)
        except AddressError as error:
            raise ConfigError(_cannot_join(source, address, str(error))) from None
        if not reachable(gcs):
            raise ConfigError(_cannot_join(source, address, f"the GCS it names, {gcs}, is not reachable from here"))
        return gcs
    if address != "auto" and "://" not in address and not reachable(address):
        raise ConfigError(f"{source}={address}: no Ray GCS answers there: is the cluster up? Set RAY_ADDRESS / "
                          f"ray.address to its GCS address (HOST:6379) or its job API (http://HOST:8265)")
    return address


def _cannot_join(source: str, address: str, reason: str) -> str:
    return (f"{source}={address} is a job API and its cluster cannot be joined from here ({reason}): submit the "
            f"command as a job (pipeline submit jobs/<spec>.yaml) or set RAY_ADDRESS / ray.address to the GCS "
            f"address (HOST:6379)")


@contextlib.contextmanager
def _loopback_only():
    """A local Ray listens on 127.0.0.1 only. By default its GCS, raylet, workers and agents listen on
    every interface, reachable from the network. Each of those processes asks Ray for "the node's
    address"; with this variable (inherited from the environment at start-up) the answer is the
    loopback address, which is also what the servers then bind."""
    from ray._private import ray_constants  # read by this process's own ray.init

    saved, saved_constant = os.environ.get(_NODE_IP_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_NODE_IP_SWITCH], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved is None:
            os.environ.pop(_NODE_IP_SWITCH, None)
        else:
            os.environ[_NODE_IP_SWITCH] = saved
