"""Servers the end-to-end tests start: bound to 127.0.0.1, owned by PID, every wait bounded."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # not from conftest: the benches import this module too

REQUEST_LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]"')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(**extra) -> dict:
    """This process's environment without what the tests set for themselves."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {**env, **extra}


def wait_for_health(uri: str, process: subprocess.Popen, within_s: float, hint: str = "", path: str = "/health") -> None:
    """Until `uri` + `path` answers; fails at once if `process` exits, and after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}{path}", timeout=2):
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; {hint}") from None
            time.sleep(0.2)
    raise TimeoutError(f"{uri}{path} did not answer within {within_s:g} s")


def tags(record: dict) -> dict[str, str]:
    """The `tags` of an experiment, run data, input or logged model as the REST API returns them."""
    return {tag["key"]: tag["value"] for tag in record.get("tags", [])}


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a sqlite store in `root`; restartable on the same port and store."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.store_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.process: subprocess.Popen | None = None

    def start(self, ready_within_s: float = 120) -> MlflowServer:
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

    def api(self, path: str, body: dict | None = None, timeout_s: float = 30) -> dict:
        """One call to the REST API the UI reads (`experiments/get?...`, `runs/search`): GET, or
        POST with a JSON `body`."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def ui_records(self, experiment: str) -> tuple[dict, list[dict], list[dict]]:
        """An experiment as the UI loads it: the experiment, its runs, and the logged models of
        its Models column, from the calls the UI's bundle makes (experiments/get, runs/search,
        logged-models/search)."""
        found = self.api(f"experiments/get-by-name?experiment_name={urllib.parse.quote(experiment)}")
        experiment_id = found["experiment"]["experiment_id"]
        record = self.api(f"experiments/get?experiment_id={experiment_id}")["experiment"]
        runs = self.api("runs/search", {"experiment_ids": [experiment_id], "max_results": 1000}).get("runs", [])
        models = self.api("logged-models/search", {"experiment_ids": [experiment_id]}).get("models", [])
        return record, runs, models

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


class MotoServer:
    """An S3-compatible server (moto) on 127.0.0.1 that checks credentials, owned by PID.

    moto skips authentication for its first INITIAL_NO_AUTH_ACTION_COUNT requests and checks every
    signature and IAM policy after them (the variable unset: never). The first three requests create an
    IAM user with an allow-all S3 policy and its access key; from then on only that key gets in.
    """

    REGION = "us-east-1"
    SETUP_REQUESTS = 3  # CreateUser, PutUserPolicy, CreateAccessKey

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key: str | None = None
        self.secret_key: str | None = None
        self.process: subprocess.Popen | None = None
        self._buckets = 0

    def start(self, ready_within_s: float = 60) -> MotoServer:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "moto.log").open("a")
        env = {k: v for k, v in clean_env().items() if not k.startswith("AWS_")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(self.SETUP_REQUESTS)
        self.process = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            # /moto-api/ requests are not AWS actions: they do not use up the unauthenticated ones
            wait_for_health(self.endpoint, self.process, ready_within_s, f"see {self.root / 'moto.log'}",
                            path="/moto-api/config")
            self._create_user()
        except BaseException:
            self.stop()
            raise
        return self

    def _create_user(self) -> None:
        import json

        iam = self._client("iam", "setup", "setup")
        iam.create_user(UserName="pipeline-tests")
        iam.put_user_policy(UserName="pipeline-tests", PolicyName="s3-all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="pipeline-tests")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def _client(self, service: str, access_key: str, secret_key: str):
        import boto3
        from botocore.config import Config

        return boto3.client(service, endpoint_url=self.endpoint, region_name=self.REGION,
                            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                            config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 1}))

    def client(self, service: str = "s3"):
        """A boto3 client with the good key."""
        return self._client(service, self.access_key, self.secret_key)

    def bucket(self, prefix: str = "t") -> str:
        """A new, empty bucket's name (unique in this server's life)."""
        self._buckets += 1
        name = f"{prefix}-{self._buckets}-{os.getpid()}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, access_key: str | None = None, secret_key: str | None = None) -> dict[str, str]:
        """The variables that point the AWS SDKs (pyarrow's too) at this server, with the good key
        unless told otherwise; for subprocesses: `clean_env(**s3.env())`."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": access_key or self.access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key, "AWS_DEFAULT_REGION": self.REGION,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def requests(self) -> list[tuple[str, str]]:
        """(method, path?query) of every request the server has answered so far, in the order it answered
        them (its access log: one line per request, written before the response leaves)."""
        text = (self.root / "moto.log").read_text(errors="replace")
        return REQUEST_LINE.findall(text)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
