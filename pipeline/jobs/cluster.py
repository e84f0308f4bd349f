"""`pipeline cluster up|down|status`: a local development cluster, a head plus one worker node.

Both nodes are `ray start --block` processes that this module starts in their own sessions, so it
owns their PIDs: `down` stops exactly them (never `ray stop`, which would stop every Ray on the
machine). PIDs, ports and logs live in the run directory. The dashboard binds 127.0.0.1; Ray 2.60
turns token authentication on, and `ray start` writes the token to ~/.ray/auth_token.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.runtime import ONE_MACHINE_RAY_ENV

DEFAULT_RUN_DIR = Path(".cache/pipeline/cluster")
STATE_FILE = "cluster.json"


class ClusterError(RuntimeError):
    """The local cluster could not be started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class LocalCluster:
    run_dir: str
    head_pid: int
    worker_pid: int
    gcs_port: int
    dashboard_port: int

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def pids(self) -> list[int]:
        return [self.worker_pid, self.head_pid]  # the worker first: it must leave before the head


def node_env(scratch: Path) -> dict[str, str]:
    """A node's environment: token mode said explicitly (Ray 2.60 CLI processes need it to read
    ~/.ray/auth_token), this interpreter's bin directory first on PATH, so that a job's
    `python -m pipeline` runs with the project's dependencies, and a directory of the node's own for
    node-local copies (models, checkpoints), as if it were another machine: whatever the nodes share
    must go through storage both can reach (a bucket). (TMPDIR stays: Ray's socket paths under it
    may not exceed 107 bytes.)"""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    scratch.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **ONE_MACHINE_RAY_ENV, "PATH": path, "RAY_AUTH_MODE": "token",
            "RAY_USAGE_STATS_ENABLED": "0", "PIPELINE_LOCAL_CACHE": str(scratch / "local-cache")}


def ray_temp_dir(run_dir: Path) -> Path:
    """Ray's session directory, kept short: its Unix socket paths may not exceed 107 bytes."""
    return Path(tempfile.gettempdir()) / f"ray-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray_start(args: list[str], log: Path) -> int:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with log.open("ab") as out:
        process = subprocess.Popen([ray_cli, "start", "--block", "--disable-usage-stats", *args], stdout=out,
                                   stderr=subprocess.STDOUT, env=node_env(log.with_suffix("")),
                                   start_new_session=True)
    return process.pid


def up(run_dir: Path = DEFAULT_RUN_DIR, cpus_per_node: int = 2, timeout_s: float = 120) -> LocalCluster:
    """Start the head and one worker node and wait until both are registered."""
    run_dir = run_dir.resolve()
    existing = read_state(run_dir)
    if existing and any(is_alive(pid) for pid in existing.pids):
        raise ClusterError(f"a local cluster is already running from {run_dir} (pids {existing.pids}); "
                           f"stop it with: pipeline cluster down")
    run_dir.mkdir(parents=True, exist_ok=True)
    gcs_port, dashboard_port = _free_port(), _free_port()
    head = _ray_start(["--head", f"--port={gcs_port}", f"--num-cpus={cpus_per_node}", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dashboard_port}", f"--temp-dir={ray_temp_dir(run_dir)}"],
                      run_dir / "head.log")
    state = LocalCluster(str(run_dir), head, -1, gcs_port, dashboard_port)
    _write_state(state)
    _wait_for(lambda: _nodes_alive(state) >= 1, timeout_s, "the head node", state)
    worker = _ray_start([f"--address=127.0.0.1:{gcs_port}", f"--num-cpus={cpus_per_node}"], run_dir / "worker.log")
    state = LocalCluster(str(run_dir), head, worker, gcs_port, dashboard_port)
    _write_state(state)
    _wait_for(lambda: _nodes_alive(state) >= 2, timeout_s, "the worker node", state)
    return state


def down(run_dir: Path = DEFAULT_RUN_DIR, timeout_s: float = 60) -> list[int]:
    """Stop the nodes this module started (SIGTERM, then SIGKILL after `timeout_s`); the PIDs stopped."""
    state = read_state(run_dir.resolve())
    if state is None:
        return []
    stopped = []
    for pid in state.pids:
        if pid > 0 and is_alive(pid):
            _stop_group(pid, timeout_s)
            stopped.append(pid)
    (Path(state.run_dir) / STATE_FILE).unlink(missing_ok=True)
    return stopped


def status(run_dir: Path = DEFAULT_RUN_DIR) -> str:
    state = read_state(run_dir.resolve())
    if state is None:
        return f"no local cluster recorded in {run_dir.resolve()}"
    alive = {pid: is_alive(pid) for pid in state.pids}
    nodes = _nodes_alive(state) if all(alive.values()) else 0
    return (f"local cluster in {state.run_dir}: head pid {state.head_pid} ({'up' if alive[state.head_pid] else 'down'}), "
            f"worker pid {state.worker_pid} ({'up' if alive[state.worker_pid] else 'down'}), {nodes} nodes alive\n"
            f"  dashboard / job API: {state.address}   GCS: 127.0.0.1:{state.gcs_port}")


def read_state(run_dir: Path) -> LocalCluster | None:
    path = run_dir / STATE_FILE
    return LocalCluster(**json.loads(path.read_text())) if path.is_file() else None


def _write_state(state: LocalCluster) -> None:
    path = Path(state.run_dir) / STATE_FILE
    path.with_suffix(".tmp").write_text(json.dumps(asdict(state)))
    path.with_suffix(".tmp").replace(path)


def _nodes_alive(state: LocalCluster) -> int:
    """Alive nodes, from the job API's view of the cluster (token-authenticated)."""
    from pipeline.jobs.submit import cluster_nodes

    try:
        return cluster_nodes(state.address)
    except Exception:  # noqa: BLE001 - not up yet: the caller's wait loop is bounded
        return 0


def _wait_for(ready, timeout_s: float, what: str, state: LocalCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if not all(is_alive(pid) for pid in state.pids if pid > 0):
            break
        time.sleep(1)
    down(Path(state.run_dir))
    raise ClusterError(f"{what} did not come up within {timeout_s:.0f}s; see the logs in {state.run_dir}")


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _stop_group(pid: int, timeout_s: float) -> None:
    """SIGTERM `ray start --block`, which stops its raylet/GCS itself; SIGKILL its whole session if
    it is not gone within `timeout_s`. Both waits are bounded."""
    for send, sig in ((os.kill, signal.SIGTERM), (os.killpg, signal.SIGKILL)):
        try:
            send(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and is_alive(pid):
            time.sleep(0.5)
        if not is_alive(pid):
            return
