"""Servers the end-to-end tests start: bound to 127.0.0.1, owned by PID, every wait bounded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import REPO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(**extra) -> dict:
    """This process's environment without what the tests set for themselves."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {**env, **extra}


def wait_for_health(uri: str, process: subprocess.Popen, within_s: float, hint: str = "") -> None:
    """Until `uri`/health answers; fails at once if `process` exits, and after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; {hint}") from None
            time.sleep(0.5)
    raise TimeoutError(f"{uri}/health did not answer within {within_s:g} s")


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a sqlite store in `root`; restartable on the same port and store."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.store_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.process: subprocess.Popen | None = None

    def start(self, ready_within_s: float = 120) -> "MlflowServer":
        log = (self.root / "mlflow.log").open("a")
        self.process = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "mlflow"), "server", "--backend-store-uri", self.store_uri,
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=clean_env())
        try:
            wait_for_health(self.uri, self.process, ready_within_s, f"see {self.root / 'mlflow.log'}")
        except TimeoutError:
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """A crash: SIGKILL to the server's whole process group, no shutdown."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # one SIGTERM stops the server and its workers
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
