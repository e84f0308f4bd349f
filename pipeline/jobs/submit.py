"""`pipeline submit` and `pipeline jobs`: Ray Jobs on a cluster, followed from this machine.

Authentication: Ray 2.60 clusters require a token. The client reads it the way Ray's own CLI does
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, with RAY_AUTH_MODE=token), and a
missing or wrong token becomes one line instead of an HTTP traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from pathlib import Path

from pipeline.ray_address import PROBE_TIMEOUT_S, AddressError, job_api_of, reachable, use_token_auth

REPO_ROOT = Path(__file__).resolve().parents[2]
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


class JobError(RuntimeError):
    """A job API call failed or a job did not succeed; the message is one line for the user."""


def resolve_address(address: str | None) -> str:
    """The job API URL for `--address`, else RAY_API_SERVER_ADDRESS (Ray's job CLI reads it first),
    else RAY_ADDRESS. The same RAY_ADDRESS serves `pipeline train`, so a GCS address (HOST:6379,
    `auto`) is taken too: its job API is read from the cluster."""
    given = address or os.environ.get(API_SERVER_ENV) or os.environ.get("RAY_ADDRESS")
    if not given:
        raise JobError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    return _job_api_for(given)


@functools.lru_cache(maxsize=8)  # one lookup per address and process: messages name the address again
def _job_api_for(address: str) -> str:
    if "://" in address:
        return address
    if address != "auto":
        if not reachable(address):
            raise JobError(f"nothing answers at {address}: is the cluster up and the address right (its job API "
                           f"http://HOST:8265 or its GCS HOST:6379)?")
        if _answers_http(address):  # HOST:8265 without the scheme, as before
            return f"http://{address}"
    try:
        return job_api_of(address)
    except AddressError as error:
        raise JobError(f"{address} was taken for the cluster's GCS address and names no job API ({error}): "
                       f"pass --address or set RAY_ADDRESS to the job API (http://HOST:8265)") from None


def _answers_http(address: str) -> bool:
    """Whether HOST:PORT speaks HTTP (any status: a job API without a token still answers 401);
    a GCS speaks gRPC and drops the request."""
    import requests

    try:
        requests.get(f"http://{address}/api/version", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException:
        return False
    return True


def job_client(address: str | None):
    """A JobSubmissionClient for the cluster, with token auth, or a JobError naming the problem."""
    use_token_auth()  # Ray's client only sends a token in token mode
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    try:
        with _address_as_given():
            return JobSubmissionClient(address)
    except Exception as error:  # noqa: BLE001 - Ray raises plain exceptions carrying the HTTP status in the text
        raise JobError(_explain(error, address)) from None


@contextlib.contextmanager
def _address_as_given():
    """Ray's submission and state clients replace the address they are given with
    RAY_API_SERVER_ADDRESS or RAY_ADDRESS when either is set. The address is resolved here already
    (`--address` first), so both are hidden while a client is built."""
    saved = {name: os.environ.pop(name) for name in (API_SERVER_ENV, "RAY_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _explain(error: Exception, address: str) -> str:
    text = str(error)
    if "401" in text or "Unauthorized" in text or "nauthenticated" in text or "token" in text.lower():
        return (f"the Ray job API at {address} rejected the authentication token: set RAY_AUTH_TOKEN (or "
                f"~/.ray/auth_token) to the cluster's token")
    if "Connection" in text or "connect" in text:
        return f"cannot reach the Ray job API at {address}: is the cluster up and the address right?"
    return f"Ray job API at {address}: {text.strip().splitlines()[-1] if text.strip() else type(error).__name__}"


def cluster_nodes(address: str) -> int:
    """How many alive nodes the cluster behind `address` has (used to wait for a local cluster)."""
    use_token_auth()
    from ray.util.state import list_nodes

    with _address_as_given():
        nodes = list_nodes(address=address, timeout=5, raise_on_missing_output=False)
    return sum(node.state == "ALIVE" for node in nodes)


def submit(spec_path: Path, address: str | None, overrides: list[str], wait: bool = True) -> tuple[str, int]:
    """Submit a job spec; with `wait`, stream its logs and return (job id, exit code: 0 only if SUCCEEDED)."""
    from pipeline.jobs.spec import load_job_spec, runtime_env_dict

    spec = load_job_spec(spec_path, overrides)
    runtime_env = runtime_env_dict(spec, REPO_ROOT)  # a spec error is the spec's, before any cluster call
    client = job_client(address)
    # `python -m pipeline` rather than the console script: the cluster's PATH may not have it.
    entrypoint = "python -m " + spec.entrypoint
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                   entrypoint_num_cpus=spec.resources.entrypoint_num_cpus,
                                   entrypoint_num_gpus=spec.resources.entrypoint_num_gpus,
                                   metadata=dict(spec.metadata))
    except Exception as error:  # noqa: BLE001 - Ray raises plain exceptions; _explain words them
        raise JobError(_explain(error, resolve_address(address))) from None
    print(f"submitted job {job_id} to {resolve_address(address)}: {entrypoint}", flush=True)
    if not wait:
        return job_id, 0
    return job_id, follow(client, job_id, address)


def follow(client, job_id: str, address: str | None) -> int:
    """Stream the job's logs until it ends; Ctrl-C detaches (the job keeps running)."""
    try:
        asyncio.run(_stream_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"\ndetached from job {job_id}; it keeps running. Stop it with: "
              f"pipeline jobs stop {job_id} --address {resolve_address(address)}", flush=True)
        return 130
    info = client.get_job_info(job_id)
    if info.status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", flush=True)
        return 0
    print(f"job {job_id} {info.status}: {(info.message or '').strip()}", flush=True)
    return 1


async def _stream_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def list_jobs(address: str | None) -> str:
    jobs = job_client(address).list_jobs()
    lines = [f"{'job id':28} {'status':10} entrypoint"]
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        lines.append(f"{(job.submission_id or job.job_id or '')[:28]:28} {job.status:10} {job.entrypoint}")
    return "\n".join(lines)


def job_status(address: str | None, job_id: str) -> str:
    info = _job_call(address, "get_job_info", job_id)
    message = f": {info.message.strip()}" if info.message else ""
    return f"{job_id} {info.status}{message}"


def job_logs(address: str | None, job_id: str) -> str:
    return _job_call(address, "get_job_logs", job_id)


def stop_job(address: str | None, job_id: str) -> str:
    stopped = _job_call(address, "stop_job", job_id)
    return f"{job_id}: {'stop requested' if stopped else 'already finished'}"


def _job_call(address: str | None, method: str, job_id: str):
    client = job_client(address)
    try:
        return getattr(client, method)(job_id)
    except Exception as error:  # noqa: BLE001 - Ray raises plain exceptions; _explain words them
        raise JobError(f"job {job_id}: {_explain(error, resolve_address(address))}") from None
