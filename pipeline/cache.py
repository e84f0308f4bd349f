"""A tiny content-addressed directory cache: build into a temp dir, then rename into place.

A crash half-way leaves only a `.tmp-*` directory, never a cache entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def stable_hash(payload: Any, length: int = 16) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_identity(path: Path) -> list:
    """Cheap identity of a file for cache keys: path, size and modification time."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cached_dir(root: str | Path, key: str, build: Callable[[Path], None]) -> Path:
    """Return root/key, calling build(tmp_dir) first if it does not exist yet."""
    root = Path(root).expanduser().resolve()
    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # a concurrent builder did not win the race either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
