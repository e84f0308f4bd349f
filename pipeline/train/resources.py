"""Whether the Ray cluster can ever run the job, and waiting (bounded) until it can.

On an autoscaling cluster the GPUs a job needs may not exist yet (a CPU-only head with GPU worker
groups at `min_workers: 0`). So the preflight check compares the job with what the cluster can
scale to (the autoscaler's node groups and their maximum counts, as it reports them to Ray's GCS),
and a job that fits only after scaling up asks for its workers' bundles as a placement group (a
resource demand the autoscaler acts on) and waits for it, saying what it waits for, until
`train.resources_timeout_s`.
"""

from __future__ import annotations

import logging
import time

from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0
QUIET_WAIT_S = 5.0  # placed within this: nothing to report


class ResourcesTimeout(RuntimeError):
    """The cluster did not provide the workers' resources within train.resources_timeout_s."""


def worker_bundle(cfg: Config) -> dict[str, float]:
    """What Ray Train reserves for one worker (ScalingConfig's resources_per_worker plus its GPU)."""
    return {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1.0} if cfg.train.use_gpu else {}),
            **cfg.train.resources_per_worker}


def fewest_workers(cfg: Config) -> int:
    return cfg.train.min_workers or cfg.train.num_workers  # with a worker range, Ray Train starts with what fits


def scalable_resources() -> dict[str, float]:
    """What the cluster has now, or can scale to where an autoscaler reports its node groups: per
    resource, the larger of the two."""
    import ray
    import ray._private.state

    now = ray.cluster_resources()
    try:  # reported by the autoscaler (KubeRay's, `ray up`'s); absent on a fixed cluster
        ceiling = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception as error:  # noqa: BLE001 - an older or unusual GCS: judge by what is up now
        log.debug("no autoscaler configuration: %s", error)
        ceiling = {}
    return {key: max(now.get(key, 0.0), float(ceiling.get(key, 0))) for key in {*now, *ceiling}}


def check_against_cluster(cfg: Config) -> None:
    """Ray would wait forever for resources the cluster cannot have: fail now, naming the field."""
    t = cfg.train
    reach = scalable_resources()
    gpus = reach.get("GPU", 0.0)
    if t.use_gpu and gpus < fewest_workers(cfg):
        raise ConfigError(f"train.use_gpu: the Ray cluster has (or can scale to) {gpus:g} GPUs, fewer than "
                          f"{fewest_workers(cfg)} workers need (train.num_workers / train.min_workers)")
    for key, amount in worker_bundle(cfg).items():
        if key != "GPU" and amount * fewest_workers(cfg) > reach.get(key, 0.0):
            field = "train.cpus_per_worker" if key == "CPU" else "train.resources_per_worker"
            unit = "CPUs" if key == "CPU" else key
            raise ConfigError(f"{field}: {fewest_workers(cfg)} workers x {amount:g} {unit} is more than the "
                              f"{reach.get(key, 0.0):g} {unit} the Ray cluster has (or can scale to)")


def runs_that_fit(per_run: dict[str, float]) -> int:
    """How many runs, each reserving `per_run`, the cluster fits at once (or can scale to)."""
    reach = scalable_resources()
    return min(int(reach.get(key, 0.0) // amount) for key, amount in per_run.items() if amount > 0)


def wait_for_workers(cfg: Config, say=print) -> None:
    """Return once the cluster can place the fewest workers the run starts with; meanwhile say every
    30 s what is missing. Raises ResourcesTimeout after train.resources_timeout_s.

    The workers' bundles are asked for as a placement group, which is exact (per node, as Ray Train
    places them) and is the resource demand an autoscaler scales up for. It is removed as soon as it
    is placed: Ray Train then reserves its own."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle, count = worker_bundle(cfg), fewest_workers(cfg)
    timeout, wanted = cfg.train.resources_timeout_s, f"{count} workers x {describe(bundle)}"
    group = placement_group([bundle] * count, strategy="PACK")
    started = time.monotonic()
    try:
        ready, _ = ray.wait([group.ready()], timeout=min(QUIET_WAIT_S, timeout))
        if ready:
            return  # the usual case: it fits now, and nothing is said
        say(f"[pipeline] waiting up to {timeout:g} s (train.resources_timeout_s) for {wanted}; free now: "
            f"{describe(ray.available_resources())}")
        deadline = started + timeout
        while not ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResourcesTimeout(f"train.resources_timeout_s: waited {timeout:g} s for {wanted}, and the "
                                       f"cluster has {describe(ray.available_resources())} free: it did not scale "
                                       f"up (check the autoscaler's node groups and quotas), or raise the timeout")
            interval = min(PROGRESS_EVERY_S, remaining)
            ready, _ = ray.wait([group.ready()], timeout=interval)
            if not ready and interval == PROGRESS_EVERY_S:  # a whole interval passed, not the last piece
                say(f"[pipeline] still waiting for {wanted} after {time.monotonic() - started:.0f} s; "
                    f"free now: {describe(ray.available_resources())}")
        say(f"[pipeline] {wanted} placed after {time.monotonic() - started:.0f} s")
    finally:
        remove_placement_group(group)


def describe(resources: dict[str, float]) -> str:
    shown = {key: value for key, value in sorted(resources.items())
             if not key.startswith(("node:", "accelerator_type:")) and key not in ("memory", "object_store_memory")}
    return "{" + ", ".join(f"{key}: {value:g}" for key, value in shown.items()) + "}"
