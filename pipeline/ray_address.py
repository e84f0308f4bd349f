"""The two addresses of a Ray cluster, and how to get from the one the user set to the other.

A cluster has two addresses. `ray.init` joins its GCS (`HOST:6379`); `pipeline submit` and
`pipeline jobs` talk to its job API, the dashboard (`http://HOST:8265`). Users set one
RAY_ADDRESS (or `ray.address`, or `--address`) for every command, so each side accepts both:

- job API -> GCS: Ray 2.60 has no endpoint that names the GCS. The dashboard's node summary
  (`/nodes?view=summary`, what its UI reads) carries each raylet's command line, and a raylet is
  started with `--gcs-address=HOST:PORT`: the head node's is the cluster's GCS address.
- GCS -> job API: the dashboard writes its address into the GCS internal KV; Ray's own job CLI reads
  it there (`ray.dashboard.utils.ray_address_to_api_server_url`).

Joining a GCS from outside the cluster only works where its port is reachable. Every lookup and
probe here is bounded, and a failure is an AddressError whose text says why in a few words.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

JOB_API_SCHEMES = ("http://", "https://")
PROBE_TIMEOUT_S = 3.0
LOOKUP_TIMEOUT_S = 20.0  # the dashboard fills a node's command line in after its agent's first report
_GCS_FLAG = "--gcs-address="


class AddressError(RuntimeError):
    """An address could not be translated or reached; the text is a short reason, for the caller to word."""


def is_job_api(address: str) -> bool:
    return address.startswith(JOB_API_SCHEMES)


def use_token_auth() -> None:
    """Token mode, unless the user chose otherwise: Ray 2.60 clusters require a token, and Ray's
    clients only send one (`~/.ray/auth_token`, RAY_AUTH_TOKEN) in token mode. Ray reads the mode
    once, when it is imported; it re-reads it on `Config.initialize`, as Ray's own
    `_enable_token_auth` does when it switches the mode after import."""
    if os.environ.setdefault("RAY_AUTH_MODE", "token") == "token" and "ray" in sys.modules:
        from ray._raylet import AuthenticationMode, Config, get_authentication_mode

        if get_authentication_mode() != AuthenticationMode.TOKEN:
            Config.initialize("")


def reachable(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether HOST:PORT accepts a TCP connection. Checked before Ray's own GCS client, which waits
    about 40 s on an address where nothing answers, printing C++ warnings meanwhile."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def gcs_address_of(job_api: str, timeout_s: float = LOOKUP_TIMEOUT_S) -> str:
    """The GCS address (HOST:PORT) of the cluster whose job API is `job_api`, from the head node's
    raylet command line in the dashboard's node summary; AddressError if the job API does not
    answer, is not Ray's, or names no GCS within `timeout_s`."""
    import requests

    use_token_auth()
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    url = job_api.rstrip("/") + "/nodes?view=summary"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = requests.get(url, headers=get_auth_headers_if_auth_enabled({}), timeout=PROBE_TIMEOUT_S)
        except requests.RequestException:
            raise AddressError(f"nothing answers at {job_api}") from None
        if response.status_code in (401, 403):
            raise AddressError(f"the job API at {job_api} rejected the authentication token (RAY_AUTH_TOKEN, "
                               f"~/.ray/auth_token)")
        try:
            summary = response.json()["data"]["summary"]
        except (ValueError, KeyError, TypeError):
            raise AddressError(f"{job_api} does not answer as a Ray job API") from None
        address = _head_gcs_flag(summary)
        if address:
            return address
        if time.monotonic() >= deadline:
            raise AddressError(f"the job API at {job_api} named no GCS address within {timeout_s:.0f} s")
        time.sleep(1)


def _head_gcs_flag(summary: list) -> str | None:
    for node in summary:
        if isinstance(node, dict) and node.get("raylet", {}).get("isHeadNode"):
            for arg in node.get("cmdline") or []:
                if arg.startswith(_GCS_FLAG):
                    return arg[len(_GCS_FLAG):]
    return None


def job_api_of(gcs_address: str, timeout_s: float = LOOKUP_TIMEOUT_S) -> str:
    """The job API URL of the cluster whose GCS is `gcs_address` (HOST:PORT or `auto`), read from
    the GCS's internal KV the way Ray's job CLI does; AddressError if no GCS answers there or it
    names no dashboard within `timeout_s`."""
    use_token_auth()
    from ray._private import services

    try:
        gcs_address = services.canonicalize_bootstrap_address_or_die(gcs_address)
    except (ConnectionError, ValueError) as error:
        raise AddressError(str(error).strip().splitlines()[0]) from None
    if not reachable(gcs_address):
        raise AddressError(f"no Ray GCS answers at {gcs_address}")
    return _bounded(_read_dashboard_url, gcs_address, timeout_s,
                    f"the GCS at {gcs_address} named no job API within {timeout_s:.0f} s")


def _read_dashboard_url(gcs_address: str) -> str:
    from ray.dashboard.utils import ray_address_to_api_server_url

    return ray_address_to_api_server_url(gcs_address)


def _bounded(call, argument: str, timeout_s: float, timeout_reason: str) -> str:
    """`call(argument)` in a daemon thread, given up after `timeout_s`: Ray's GCS client blocks in
    C++ with retries of its own (about 40 s), which no Python timeout interrupts. A thread given up
    on stays blocked, and a daemon thread does not hold up the exit that follows the error."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call(argument)
        except Exception as error:  # noqa: BLE001 - handed to the caller's thread, worded there
            outcome["error"] = error

    worker = threading.Thread(target=run, name="ray-address-lookup", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if "value" in outcome:
        return str(outcome["value"])
    if "error" in outcome:
        error = outcome["error"]
        raise AddressError(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    raise AddressError(timeout_reason)
