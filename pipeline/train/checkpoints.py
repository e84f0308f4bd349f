"""Checkpoint integrity: a manifest per rank commits a checkpoint, and resuming picks the newest
checkpoint whose manifests verify, warning about (and skipping) any newer one that does not.

How a checkpoint is written: each rank saves its DeepSpeed files into its own local temporary
directory and writes its manifest (every file's size and SHA-256) there. Its upload (the worker's
`checkpoint_upload_fn` for Ray Train) then copies the files into the run's `checkpoint_*` directory,
on local disk or in object storage, the manifest after all the others: object stores have no
rename, so the manifest written last is the commit. A crash at any point leaves either no manifest
or files that do not match one, so a partial or corrupted checkpoint is detected instead of loaded.

Every function here takes a location: a local path or an object-storage URI (`s3://`, `gs://`).
A checkpoint is read with one listing (which gives every file's size), one read per manifest, and
one streamed read per file for its hash; nothing is asked file by file that the listing answers.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import posixpath
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipeline import storage
from pipeline.config import is_uri

TAG_FILE = "pipeline_tag"
MANIFEST = "pipeline_manifest.rank{rank}.json"
MANIFEST_GLOB = "pipeline_manifest.rank*.json"
# DeepSpeed's names inside a tag directory: stages 0-2 store the whole module in one file (ZeRO-3
# names its model files per rank and keeps the weights only in the optimizer partitions).
WHOLE_MODULE_FILE = "mp_rank_00_model_states.pt"
OPTIMIZER_GLOB = "*optim_states.pt"

Location = str | os.PathLike  # a local path or a URI
SIZES_ONLY = (0, 0)  # a `share` that hashes nothing: the listing and the manifests only
# How a checkpoint is judged: its location (as every rank saw it) and its problem, or None. The
# default hashes every file here; the ranks of a run each hash a share and agree (`train.rank`).
Verify = Callable[["_Stored"], str | None]


def verify_everything(stored: _Stored) -> str | None:
    return stored.problem()


def verify_sizes_only(stored: _Stored) -> str | None:
    """The listing and the manifests, no hashing: for a driver whose ranks hash their own shares."""
    return stored.problem(SIZES_ONLY)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message lists what was wrong with each."""


@dataclass(frozen=True)
class Skipped:
    path: str  # the checkpoint's location
    problem: str


def write_manifest(directory: Path, rank: int, world_size: int, tick: int) -> None:
    """Record this rank's files (everything in the local `directory` but manifests), then commit atomically."""
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": storage.sha256(str(p))}
             for p in sorted(directory.rglob("*")) if p.is_file() and not p.match(MANIFEST_GLOB)}
    manifest = {"tick": tick, "rank": rank, "world_size": world_size, "files": files}
    storage.write_text(str(directory / MANIFEST.format(rank=rank)), json.dumps(manifest, indent=1))


class _Stored:
    """One checkpoint directory as one listing saw it; its manifests are read once, when first asked."""

    def __init__(self, location: str):
        self.location = location
        self.files = _files(location)

    @cached_property
    def manifests(self) -> list[dict | str]:
        """Each top-level manifest, by name: its content, or why it could not be read."""
        loaded = []
        for name in sorted(n for n in self.files if "/" not in n and fnmatch.fnmatchcase(n, MANIFEST_GLOB)):
            try:
                loaded.append(json.loads(storage.read_text(self.files[name].location)))
            except (OSError, ValueError) as exc:
                loaded.append(f"unreadable manifest ({exc})")
        return loaded

    @cached_property
    def tick(self) -> int | None:
        for manifest in self.manifests:
            try:
                return int(manifest["tick"])
            except (TypeError, ValueError, KeyError):
                continue
        return None

    @cached_property
    def order(self) -> tuple[float, str]:
        """Newest first by tick, which a node's clock cannot disturb (Ray names checkpoints by wall-clock
        time). A directory whose tick cannot be read yet (cut short before its tag or manifest) counts as
        the newest, so that it is checked, and named, before an older one is used."""
        tick = self.tick
        if tick is None and TAG_FILE in self.files:
            try:
                tick = int(storage.read_text(self.files[TAG_FILE].location).strip().removeprefix("tick-"))
            except (OSError, ValueError):
                tick = None
        return (float("inf") if tick is None else float(tick), posixpath.basename(self.location))

    def problem(self, share: tuple[int, int] = (0, 1)) -> str | None:
        """What is wrong with this checkpoint, or None. `share` = (rank, ranks): every rank checks
        the listing and the manifests, and hashes only the files of its share: a file belongs to the
        lowest manifest rank m that lists it, and goes to rank m mod ranks (so at the same world size
        each rank hashes the files it wrote and will load, and no file is read twice). (0, 1) hashes
        everything; SIZES_ONLY hashes nothing."""
        problem, expected = self._listing_problem()
        if problem or share == SIZES_ONLY:
            return problem
        rank, ranks = share
        owner: dict[str, int] = {}
        for manifest_rank, name, _ in expected:
            owner[name] = min(owner.get(name, manifest_rank), manifest_rank)
        mine = [(name, sha256) for _, name, sha256 in expected if owner[name] % ranks == rank]
        names = list(dict.fromkeys(name for name, _ in mine))
        with ThreadPoolExecutor(storage.TRANSFER_THREADS) as pool:
            digests = dict(zip(names, pool.map(storage.sha256, [self.files[n].location for n in names]), strict=True))
        for name, sha256 in mine:
            if digests[name] != sha256:
                return f"{name} does not match its SHA-256 in the manifest"
        return None

    def _listing_problem(self) -> tuple[str | None, list[tuple[int, str, str]]]:
        """What the listing and the manifests alone show to be wrong; and (manifest rank, file, SHA-256)
        for every file the manifests list."""
        if not self.files and not storage.is_dir(self.location):
            return "not a directory", []
        if not self.manifests:
            return "no manifest (partial, or not written by this pipeline)", []
        unreadable = next((m for m in self.manifests if isinstance(m, str)), None)
        if unreadable:
            return unreadable, []
        try:
            world_size = self.manifests[0]["world_size"]
            missing = sorted(set(range(world_size)) - {m["rank"] for m in self.manifests})
            expected = [(m["rank"], name, entry["size"], entry["sha256"]) for m in self.manifests
                        for name, entry in m["files"].items()]
        except (KeyError, TypeError) as exc:
            return f"unreadable manifest (no {exc})", []
        if missing:
            return f"no manifest from rank(s) {', '.join(map(str, missing))} of {world_size}", []
        for _, name, size, _ in expected:  # the listing answers these: no request per file
            if name not in self.files:
                return f"{name} is missing", []
            if self.files[name].size != size:
                return f"{name} has {self.files[name].size} bytes, the manifest says {size}", []
        return None, [(rank, name, sha256) for rank, name, _, sha256 in expected]


def problem_with(location: Location, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why `location` is not a complete pipeline checkpoint, or None if every manifest verifies (only
    the files of `share`, see `_Stored.problem`)."""
    return _Stored(storage.resolve(os.fspath(location))).problem(share)


def checkpoint_tick(location: Location) -> int | None:
    return _Stored(storage.resolve(os.fspath(location))).tick


def choose_checkpoint(location: Location, verify: Verify = verify_everything) -> tuple[str, list[Skipped]]:
    """The newest valid checkpoint at `location`, which is either a checkpoint directory (then older
    siblings are the fallbacks) or a run directory holding `checkpoint_*` directories."""
    location = storage.resolve(os.fspath(location))
    given = _Stored(location)
    if _looks_like_checkpoint(given):
        older = [c for c in _checkpoints_in(posixpath.dirname(location)) if c.order < given.order]
        return _first_valid([given, *_newest_first(older)], verify)
    candidates = _newest_first(_checkpoints_in(location))
    if not candidates:
        raise CheckpointError(f"{location} holds no checkpoint directories")
    return _first_valid(candidates, verify)


def resume_point(run_dir: Location | None, resume_from: str | None,
                 verify: Verify = verify_everything) -> tuple[str | None, list[str]]:
    """Where a worker group resumes: the newest valid checkpoint of its own run (after a restart),
    else the newest valid one at `resume_from`, else a fresh start (None); plus warnings naming what
    was skipped. A run whose own checkpoints are all damaged starts over from `resume_from` rather
    than failing every restart."""
    candidates = _newest_first(_checkpoints_in(storage.resolve(os.fspath(run_dir)))) if run_dir else []
    warnings = []
    if candidates:
        try:
            chosen, skipped = _first_valid(candidates, verify)
            return chosen, [describe_fallback(chosen, skipped)] if skipped else []
        except CheckpointError as error:
            fallback = f"train.resume_from ({resume_from})" if resume_from else "tick 0"
            warnings.append(f"warning: {error}; starting again from {fallback}")
    if resume_from is None:
        return None, warnings
    chosen, skipped = choose_checkpoint(resume_from, verify)
    return chosen, warnings + ([describe_fallback(chosen, skipped)] if skipped else [])


def describe_fallback(chosen: Location, skipped: list[Skipped]) -> str:
    bad = "; ".join(f"{s.path} is corrupt or partial ({s.problem})" for s in skipped)
    return f"warning: {bad}; resuming from {os.fspath(chosen)} (tick {checkpoint_tick(chosen)}) instead"


@contextlib.contextmanager
def local_checkpoint(location: str) -> Iterator[Path]:
    """The checkpoint at `location` as a local directory while the block runs: itself when local,
    else a download into this node's local cache, removed afterwards (DeepSpeed reads local files)."""
    if not is_uri(location):
        yield Path(location)
        return
    with storage.local_scratch("checkpoint-") as directory:
        storage.download_dir(location, directory)
        yield directory


def _first_valid(candidates: list[_Stored], verify: Verify) -> tuple[str, list[Skipped]]:
    skipped = []
    for candidate in candidates:
        problem = verify(candidate)
        if problem is None:
            return candidate.location, skipped
        skipped.append(Skipped(candidate.location, problem))
    raise CheckpointError("no valid checkpoint: " + "; ".join(f"{s.path}: {s.problem}" for s in skipped))


def _files(location: str) -> dict[str, storage.StoredFile]:
    return {f.relative: f for f in _listed(storage.list_files, location)}


def _listed(list_below, location: str) -> list:
    """`list_below(location)`, or [] where a local file stands (nothing is below it)."""
    try:
        return list_below(location)
    except storage.StorageError:
        if storage.is_dir(location):  # a real failure (refused, unreachable): let it be named
            raise
        return []


def _looks_like_checkpoint(stored: _Stored) -> bool:
    return TAG_FILE in stored.files or bool(stored.manifests) or \
        posixpath.basename(stored.location).startswith("checkpoint_")


def _checkpoints_in(directory: str) -> list[_Stored]:
    return [_Stored(d) for d in _listed(storage.subdirectories, directory)
            if posixpath.basename(d).startswith("checkpoint_")]


def _newest_first(checkpoints: list[_Stored]) -> list[_Stored]:
    return sorted(checkpoints, key=lambda c: c.order, reverse=True)


def drop_optimizer_state(location: Location) -> int:
    """Keep only a verified checkpoint's weights: its optimizer state files go (the bytes freed are
    returned). Each manifest is rewritten first without them and marked `weights_only`, so the
    checkpoint still verifies at any moment, and a resume from it is refused by name. ZeRO-3 keeps
    its weights only inside the optimizer partitions, so a ZeRO-3 checkpoint is left whole (0)."""
    stored = _Stored(storage.resolve(os.fspath(location)))
    tag = stored.files.get(TAG_FILE) and storage.read_text(stored.files[TAG_FILE].location).strip()
    if stored.problem(SIZES_ONLY) or not tag or f"{tag}/{WHOLE_MODULE_FILE}" not in stored.files:
        return 0
    optimizer = {name for name in stored.files if fnmatch.fnmatchcase(name, f"{tag}/{OPTIMIZER_GLOB}")}
    for manifest in stored.manifests:
        manifest["files"] = {name: entry for name, entry in manifest["files"].items() if name not in optimizer}
        manifest["weights_only"] = True
        storage.write_text(storage.join(stored.location, MANIFEST.format(rank=manifest["rank"])),
                           json.dumps(manifest, indent=1))
    for name in optimizer:
        storage.delete(stored.files[name].location)
    return sum(stored.files[name].size for name in optimizer)


def weights_only(location: Location) -> bool:
    return any(isinstance(m, dict) and m.get("weights_only") for m in _Stored(storage.resolve(os.fspath(location))).manifests)


def upload_checkpoint(directory: Path, location: str, rank: int) -> None:
    """This rank's checkpoint files into `location`, its manifest after all of them: the commit
    (object stores have no rename)."""
    storage.upload_dir(directory, location, last=[MANIFEST.format(rank=rank)])


def local_tag(directory: Path) -> str:
    """The DeepSpeed tag (`tick-NNNNNN`) of a local checkpoint directory."""
    return (directory / TAG_FILE).read_text().strip()


def saved_world_size(directory: Path) -> int:
    """The number of ranks that wrote a (local) checkpoint, from its manifests."""
    return len(list(directory.glob(MANIFEST_GLOB)))


def needs_conversion(directory: Path, world: int) -> bool:
    """Whether `world` ranks can load this local checkpoint only in universal form: it was written by
    another number of ranks and holds partitioned optimizer state (ZeRO >= 1, or bf16 at stage 0).
    A stage-0 fp32 checkpoint holds whole states and loads at any world size as it is."""
    return saved_world_size(directory) != world and any(directory.glob(f"*/{OPTIMIZER_GLOB}"))


@contextlib.contextmanager
def universal_copy(directory: Path) -> Iterator[tuple[Path, str]]:
    """DeepSpeed's universal form of a local checkpoint (parameters and optimizer state unpartitioned),
    which a different number of ranks can load, on this node's local disk while the block runs;
    (directory, tag). DeepSpeed refuses to load a ZeRO
    checkpoint at another data-parallel size, and its `elastic_checkpoint` switch no longer works
    (0.19.8: "Automatic adjustment ... not currently supported"), so an elastic restart converts."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    tag = local_tag(directory)
    with storage.local_scratch("universal-") as into:
        # One worker each: no process pool inside a Ray worker. inject_missing_state: a plain (not
        # tensor-parallel) model saves no UNIVERSAL_CHECKPOINT_INFO, and the converter would refuse it.
        to_universal(argparse.Namespace(input_folder=str(directory / tag), output_folder=str(into / tag),
                                        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                        strict=True, inject_missing_state=True))
        yield into, tag
