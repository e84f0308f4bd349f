"""Checkpoint integrity: a manifest per rank commits a checkpoint, and resuming picks the newest
checkpoint whose manifests verify, warning about (and skipping) any newer one that does not.

How a checkpoint is written: each rank saves its DeepSpeed files into its own temporary directory,
writes its manifest (every file's size and SHA-256) last with an atomic rename, and hands the
directory to Ray Train, which copies the ranks' directories into one `checkpoint_*` directory in
storage and registers it. A crash at any point leaves either no manifest or files that do not match
one, so a partial or corrupted checkpoint is detected instead of being loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TAG_FILE = "pipeline_tag"
MANIFEST = "pipeline_manifest.rank{rank}.json"
MANIFEST_GLOB = "pipeline_manifest.rank*.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message lists what was wrong with each."""


@dataclass(frozen=True)
class Skipped:
    path: Path
    problem: str


def write_manifest(directory: Path, rank: int, world_size: int, tick: int) -> None:
    """Record this rank's files (everything in `directory` but manifests), then commit atomically."""
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and not p.match(MANIFEST_GLOB)}
    manifest = {"tick": tick, "rank": rank, "world_size": world_size, "files": files}
    final = directory / MANIFEST.format(rank=rank)
    temporary = final.with_suffix(".tmp")
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, final)


def problem_with(directory: Path) -> str | None:
    """Why `directory` is not a complete pipeline checkpoint, or None if every manifest verifies."""
    if not directory.is_dir():
        return "not a directory"
    manifests = sorted(directory.glob(MANIFEST_GLOB))
    if not manifests:
        return "no manifest (partial, or not written by this pipeline)"
    try:
        loaded = [json.loads(p.read_text()) for p in manifests]
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    world_size = loaded[0]["world_size"]
    missing = sorted(set(range(world_size)) - {m["rank"] for m in loaded})
    if missing:
        return f"no manifest from rank(s) {', '.join(map(str, missing))} of {world_size}"
    for manifest in loaded:
        for name, expected in manifest["files"].items():
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["size"]:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
            if _sha256(path) != expected["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
    return None


def checkpoint_tick(directory: Path) -> int | None:
    for manifest in sorted(directory.glob(MANIFEST_GLOB)):
        try:
            return int(json.loads(manifest.read_text())["tick"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def choose_checkpoint(path: Path) -> tuple[Path, list[Skipped]]:
    """The newest valid checkpoint at `path`, which is either a checkpoint directory (then older
    siblings are the fallbacks) or a run directory holding `checkpoint_*` directories."""
    path = path.resolve()
    if _looks_like_checkpoint(path):
        given = _order(path)
        candidates = [path] + [p for p in _newest_first(_checkpoints_in(path.parent)) if _order(p) < given]
    else:
        candidates = _newest_first(_checkpoints_in(path))
        if not candidates:
            raise CheckpointError(f"{path} holds no checkpoint directories")
    skipped = []
    for candidate in candidates:
        problem = problem_with(candidate)
        if problem is None:
            return candidate, skipped
        skipped.append(Skipped(candidate, problem))
    raise CheckpointError("no valid checkpoint: " + "; ".join(f"{s.path}: {s.problem}" for s in skipped))


def resume_point(run_dir: Path | None, resume_from: str | None) -> tuple[str | None, list[str]]:
    """Where a worker group resumes: the newest valid checkpoint of its own run (after a restart),
    else `resume_from`, else a fresh start (None); plus warnings naming what was skipped. A run
    whose only checkpoints are all damaged starts over from `resume_from` rather than failing every
    restart."""
    if run_dir is None or not _checkpoints_in(run_dir):
        return resume_from, []
    try:
        chosen, skipped = choose_checkpoint(run_dir)
    except CheckpointError as error:
        fallback = f"train.resume_from ({resume_from})" if resume_from else "tick 0"
        return resume_from, [f"warning: {error}; starting again from {fallback}"]
    return str(chosen), [describe_fallback(chosen, skipped)] if skipped else []


def describe_fallback(chosen: Path, skipped: list[Skipped]) -> str:
    bad = "; ".join(f"{s.path} is corrupt or partial ({s.problem})" for s in skipped)
    return f"warning: {bad}; resuming from {chosen} (tick {checkpoint_tick(chosen)}) instead"


def _looks_like_checkpoint(path: Path) -> bool:
    return (path / TAG_FILE).exists() or any(path.glob(MANIFEST_GLOB)) or path.name.startswith("checkpoint_")


def _checkpoints_in(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")] \
        if directory.is_dir() else []


def _newest_first(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=_order, reverse=True)


def _order(path: Path) -> tuple[float, str]:
    """Newest first by tick, which a node's clock cannot disturb (Ray names checkpoints by wall-clock
    time). A directory whose tick cannot be read yet (cut short before its tag or manifest) counts as
    the newest, so that it is checked, and named, before an older one is used."""
    tick = checkpoint_tick(path)
    if tick is None:
        try:
            tick = int((path / TAG_FILE).read_text().strip().removeprefix("tick-"))
        except (OSError, ValueError):
            tick = None
    return (float("inf") if tick is None else float(tick), path.name)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
