"""`pipeline submit` and `pipeline jobs`: Ray Jobs on a cluster, followed from this machine.

Authentication: Ray 2.60 clusters require a token. The client reads it the way Ray's own CLI does
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, with RAY_AUTH_MODE=token), and a
missing or wrong token becomes one line instead of an HTTP traceback.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class JobError(RuntimeError):
    """A job API call failed or a job did not succeed; the message is one line for the user."""


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    return address if "://" in address else f"http://{address}"


def job_client(address: str | None):
    """A JobSubmissionClient for the cluster, with token auth, or a JobError naming the problem."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's client only sends a token in token mode
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as error:  # noqa: BLE001 - Ray raises plain exceptions carrying the HTTP status in the text
        raise JobError(_explain(error, address)) from None


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
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when ray is first imported
    from ray.util.state import list_nodes

    return sum(node.state == "ALIVE" for node in list_nodes(address=address, timeout=5, raise_on_missing_output=False))


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
