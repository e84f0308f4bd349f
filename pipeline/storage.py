"""Where files live: local paths and object-storage URIs (`s3://`, `gs://`) behind one small API.

pyarrow.fs, not fsspec: Ray Data (`filesystem=`) and Ray Train (`storage_filesystem=`) take pyarrow
filesystems natively, pyarrow is already a dependency, its S3 and GCS clients are the AWS and Google
C++ SDKs (their standard credential chains, `AWS_ENDPOINT_URL`, parallel multipart transfers), and a
pickled filesystem carries its options but no credentials: each Ray task resolves its own on its node.

Credentials are never configured here and never logged: they come from the usual chains
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE / instance roles for s3,
GOOGLE_APPLICATION_CREDENTIALS for gs). The endpoint of an S3-compatible store is `storage.endpoint_url`
or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; the region `storage.region` or AWS_DEFAULT_REGION / AWS_REGION.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.config import Config, ConfigError, StorageConfig, is_uri

SCHEMES = ("s3", "gs", "gcs")
TRANSFER_THREADS = 8
PROBE_TIMEOUT_S = 10.0
_settings = StorageConfig()


class StorageError(ConfigError):
    """A storage location cannot be used (no bucket, refused credentials, unreachable endpoint)."""


def configure(settings: StorageConfig) -> None:
    """Set this process's storage settings (the driver from its config, each worker from its plan)."""
    global _settings
    _settings = settings
    _filesystem.cache_clear()


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `location` and the path inside it (`bucket/key` for object stores)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    scheme, _, rest = location.partition("://")
    if scheme not in SCHEMES:
        raise ConfigError(f"{location}: unsupported storage scheme '{scheme}://' (use s3://, gs:// or a local path)")
    return _filesystem("gs" if scheme == "gcs" else scheme, _settings), rest.strip("/")


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str, settings: StorageConfig) -> pafs.FileSystem:
    if scheme == "gs":
        return pafs.GcsFileSystem(retry_time_limit_seconds=settings.request_timeout_s)
    resolved = _resolved(settings)
    endpoint, region = resolved.endpoint_url, resolved.region
    options = {}
    if endpoint:
        options["endpoint_override"] = endpoint
        options["scheme"] = "http" if endpoint.startswith("http://") else "https"
    return pafs.S3FileSystem(region=region, connect_timeout=settings.connect_timeout_s,
                             request_timeout=settings.request_timeout_s,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
                             **options)


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def to_location(base: str, fs_path: str) -> str:
    """The location (URI or local path) of `fs_path`, a path inside the filesystem of `base`."""
    return f"{base.partition('://')[0]}://{fs_path}" if is_uri(base) else fs_path


def resolve(location: str) -> str:
    """The canonical form of a location: an absolute, resolved local path, or the URI without a
    trailing slash (so that locations compare and nest as strings)."""
    return to_location(location, filesystem(location)[1])


def local_path(location: str) -> Path:
    """The local path of a location; an error for object storage, which has none."""
    if is_uri(location):
        raise ValueError(f"{location} is in object storage, not a local path")
    return Path(location)


@dataclass(frozen=True)
class StoredFile:
    location: str  # URI or absolute local path
    relative: str  # below the listed directory, with '/' separators
    size: int
    mtime_ns: int


def list_files(location: str) -> list[StoredFile]:
    """Every file below `location` (recursively), sorted by relative path; [] if there is none.
    One listing call: on object storage one LIST per 1000 keys, no request per file."""
    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as error:
        raise StorageError(describe_error(error, location)) from None
    files = [StoredFile(to_location(location, i.path), i.path[len(path):].lstrip("/"), i.size or 0,
                        i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File]
    return sorted(files, key=lambda f: f.relative)


def subdirectories(location: str) -> list[str]:
    """The locations of the directories (prefixes) right below `location`, sorted; one listing call."""
    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as error:
        raise StorageError(describe_error(error, location)) from None
    return sorted(to_location(location, i.path) for i in infos if i.type == pafs.FileType.Directory)


def info(location: str) -> pafs.FileInfo:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as error:
        raise StorageError(describe_error(error, location)) from None


def exists(location: str) -> bool:
    return info(location).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    return info(location).type == pafs.FileType.Directory


def is_file(location: str) -> bool:
    return info(location).type == pafs.FileType.File


def settings() -> StorageConfig:
    """This process's settings with the endpoint and region it resolved from the environment, for
    handing to Ray tasks (which call `configure` with them): a task on another node then talks to the
    same store. Credentials are not settings: each node takes its own from its environment."""
    return _resolved(_settings)


def _resolved(settings: StorageConfig) -> StorageConfig:
    endpoint = settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = settings.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return settings.model_copy(update={"endpoint_url": endpoint, "region": region})


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except OSError as error:
        raise StorageError(describe_error(error, location)) from None


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def sha256(location: str) -> str:
    """The SHA-256 of a stored file, streamed (a checkpoint shard may not fit in memory)."""
    fs, path = filesystem(location)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes(location: str, data: bytes) -> None:
    """Whole or not at all: an object PUT is atomic; a local file is written beside and renamed."""
    fs, path = filesystem(location)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # unique per writer (threads of one process too), and never left behind
            handle, temporary = tempfile.mkstemp(prefix=f"{Path(path).name}.tmp-", dir=Path(path).parent)
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(data)
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
            return
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as error:
        raise StorageError(describe_error(error, location)) from None


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def delete(location: str) -> None:
    """Remove a file or a whole directory (prefix); a missing one is fine."""
    fs, path = filesystem(location)
    try:
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as error:
        raise StorageError(describe_error(error, location)) from None


def upload_dir(local_dir: Path, location: str, last: Iterable[str] = ()) -> None:
    """Copy a local directory's files to `location`; files named in `last` go after all the others,
    so that a reader who finds them knows the rest is complete (object stores have no rename)."""
    last = set(last)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    first = [p for p in files if p.name not in last]
    _transfer([(str(p), join(location, p.relative_to(local_dir).as_posix())) for p in first])
    _transfer([(str(p), join(location, p.relative_to(local_dir).as_posix())) for p in files if p.name in last])


def download_dir(location: str, local_dir: Path, include=None) -> list[Path]:
    """Copy the files below `location` (those for which `include(relative)` is true) into `local_dir`."""
    return _download([f for f in list_files(location) if include is None or include(f.relative)], local_dir)


def _download(files: list[StoredFile], local_dir: Path) -> list[Path]:
    pairs = [(f.location, str(Path(local_dir) / f.relative)) for f in files]
    _transfer(pairs)
    return [Path(target) for _, target in pairs]


def download_file(location: str, local_file: Path) -> Path:
    _transfer([(location, str(local_file))])
    return Path(local_file)


def _transfer(pairs: list[tuple[str, str]]) -> None:
    def copy(pair: tuple[str, str]) -> None:
        (source_fs, source), (target_fs, target) = filesystem(pair[0]), filesystem(pair[1])
        try:
            if isinstance(target_fs, pafs.LocalFileSystem):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            with source_fs.open_input_stream(source) as reader, target_fs.open_output_stream(target) as writer:
                shutil.copyfileobj(reader, writer, 8 << 20)
        except OSError as error:
            raise StorageError(describe_error(error, pair[0] if is_uri(pair[0]) else pair[1])) from None

    with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
        list(pool.map(copy, pairs))


def local_cache_root() -> Path:
    """Where this node keeps local copies of remote models and checkpoints: node-local disk, never
    shared storage (PIPELINE_LOCAL_CACHE overrides it)."""
    return Path(os.environ.get("PIPELINE_LOCAL_CACHE") or Path(tempfile.gettempdir()) / "pipeline-local")


@contextlib.contextmanager
def local_scratch(prefix: str) -> Iterator[Path]:
    """A temporary directory under this node's local cache, removed when the block ends."""
    root = local_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=root) as directory:
        yield Path(directory)


def localize(location: str, include=None) -> str:
    """A local directory holding the files of `location` (those for which `include(relative)` is
    true, all by default): itself when local, else a copy kept in this node's cache, keyed by the
    listing (sizes and times), so a changed remote copy is fetched again."""
    if not is_uri(location):
        return location
    from pipeline.cache import cached_dir, stable_hash

    files = [f for f in list_files(location) if include is None or include(f.relative)]
    if not files:
        raise StorageError(f"{location}: no files there")
    key = stable_hash([location, [(f.relative, f.size, f.mtime_ns) for f in files]])
    # exactly the files listed (one listing): the key and the copy describe the same state
    return str(cached_dir(local_cache_root(), key, lambda out: _download(files, out)))


def check_usable(location: str, field: str) -> None:
    """Fail in one line, before Ray starts, when `field`'s object-storage location cannot be used: a
    missing bucket, refused credentials, an unreachable endpoint (bounded by the storage timeouts)."""
    if not is_uri(location):
        return
    _, path = filesystem(location)
    # One attempt with a short request timeout: a pre-flight check must answer in seconds, not after
    # the retries that protect a long transfer (a silent endpoint would take attempts x timeout).
    scheme = location.partition("://")[0]
    fs = _filesystem("gs" if scheme == "gcs" else scheme, _settings.model_copy(
        update={"max_attempts": 1, "request_timeout_s": min(_settings.request_timeout_s, PROBE_TIMEOUT_S)}))
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"{field}: bucket '{bucket}' does not exist ({location})")
        fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as error:
        raise StorageError(f"{field}: {describe_error(error, location)}") from None


def check_locations(cfg: Config) -> None:
    """check_usable for every object-storage location the config names."""
    locations = {"data.path": cfg.data.path, "data.cache_dir": cfg.data.cache_dir,
                 "train.output_dir": cfg.train.output_dir, "train.resume_from": cfg.train.resume_from,
                 "model.path": cfg.model.path, "model.cache_dir": cfg.model.cache_dir,
                 "sweep.storage_dir": cfg.sweep.storage_dir}
    for field, location in locations.items():
        if location:
            check_usable(location, field)


# AWS SDK error names (pyarrow writes "AWS Error ACCESS_DENIED during ...", and one it has no name for as
# "(HTTP status 403)"), S3 error codes, google-cloud-cpp status codes. A bare "403" is no evidence: bucket
# names, keys and request ids contain digits.
_REFUSED = re.compile(r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|INVALID_ACCESS_KEY"
                      r"|SIGNATURE_DOES_NOT_MATCH|InvalidToken|EXPIRED_TOKEN|ExpiredToken|PERMISSION_DENIED"
                      r"|UNAUTHENTICATED|HTTP status 40[13]\b")


def describe_error(error: OSError, location: str) -> str:
    """One line for a storage failure, in the user's terms (never quoting a credential)."""
    text = str(error)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return f"bucket of {location} does not exist"
    if _REFUSED.search(text):
        return (f"the storage refused access to {location}: check the credentials (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or GOOGLE_APPLICATION_CREDENTIALS) and their permissions")
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "curlCode" in text or "timed out" in text:
        endpoint = _settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL") or "the default endpoint"
        return (f"cannot reach the storage endpoint {endpoint} for {location} (storage.endpoint_url or "
                f"AWS_ENDPOINT_URL)")
    if isinstance(error, FileNotFoundError):
        return f"{location} does not exist"
    return f"{location}: {text.strip().splitlines()[0] if text.strip() else type(error).__name__}"
