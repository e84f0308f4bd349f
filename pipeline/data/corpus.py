"""The corpus as metadata: which files (local or in object storage), their sizes and times, the
chunks they are read in, and the checks that need no file contents. The driver does only this.

A chunk is a list of byte ranges ("pieces") of at most about `data.chunk_bytes`: small files are
grouped, a large JSONL file is cut into several pieces. A piece owns every line that *starts* inside
its range (see parse.py), so the split depends only on file sizes, never on Ray's block layout.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.config import ConfigError, DataConfig, SplitConfig, is_uri
from pipeline.data.bad_records import BadRecords
from pipeline.locations import expand_files, resolve_path

SPLITS = ("train", "eval")
# Listing-free work in Ray tasks (packing, the tokenizer stage's input) is light next to tokenizing;
# a fractional request lets it run beside the tokenizer actors on a small machine.
LIGHT_TASK_CPUS = 0.5
BLOCKS_PER_WORKER = 4  # Ray Data blocks of chunks per actor
MIN_CHUNK_BYTES = 1024
_GLOB = re.compile(r"[*?\[]")


class CorpusFile(NamedTuple):  # a tuple: built once per file, by the thousand, on every cache hit
    location: str  # URI or absolute local path
    name: str  # relative to the corpus root: what messages and document keys show
    size: int
    mtime_ns: int

    def identity(self) -> list:
        """What the cache key covers: a changed size or time means a changed corpus."""
        return [self.location, self.size, self.mtime_ns]


def list_corpus(cfg: DataConfig, bad: BadRecords) -> list[CorpusFile]:
    """The corpus files in order, from one listing (no file is opened). Entries that cannot be read
    (dangling links, special files, no read permission) are bad records, counted or failed on here."""
    files = _list_remote(cfg.path) if is_uri(cfg.path) else _list_local(cfg.path, bad)
    arrow = [f for f in files if f.location.endswith(".arrow")]
    if _container_setting(cfg) == "hf" or (_container_setting(cfg) == "auto" and arrow):
        # A save_to_disk directory: the Arrow shards hold the rows, its JSON files are metadata.
        if not arrow:
            raise ConfigError(f"data.path: '{cfg.path}' holds no .arrow files (is it a save_to_disk directory?)")
        files = arrow
    split_rule = SplitRule(cfg.split)
    for corpus_file in files:
        split_rule.check_file_name(corpus_file.name.rsplit("/", 1)[-1])
    return files


def _list_remote(path: str) -> list[CorpusFile]:
    glob = _GLOB.search(path)
    if glob:  # list below the fixed part of the pattern, then match the whole pattern
        prefix = path[: path.rfind("/", 0, glob.start()) + 1]
        listed = [f for f in storage.list_files(prefix) if fnmatch.fnmatch(f.location, path)]
    elif storage.is_file(path):
        found = storage.info(path)
        prefix = path[: path.rfind("/") + 1]
        listed = [storage.StoredFile(path, path[len(prefix):], found.size or 0, found.mtime_ns or 0)]
    else:
        prefix, listed = path.rstrip("/") + "/", storage.list_files(path)
    files = [CorpusFile(f.location, f.location[len(prefix):], f.size, f.mtime_ns) for f in listed
             if not any(part.startswith(".") for part in f.location[len(prefix):].split("/"))]
    if not files:
        raise ConfigError(f"data.path: no files match '{path}'")
    return files


def _list_local(path: str, bad: BadRecords) -> list[CorpusFile]:
    resolved = resolve_path(path)
    if os.path.isdir(resolved) and not _GLOB.search(resolved):
        return _list_local_directory(path, os.path.realpath(resolved), bad)
    entries = sorted(p.resolve() for p in expand_files(path, "data.path"))  # a glob or one file
    root = _common_root(entries)
    files = []
    for entry in entries:
        problem = _unreadable(entry)
        if problem:
            bad.add("unreadable_file", str(entry), problem)
            continue
        stat = entry.stat()
        name = str(entry.relative_to(root)) if entry.is_relative_to(root) else str(entry)
        files.append(CorpusFile(str(entry), name, stat.st_size, stat.st_mtime_ns))
    return files


def _list_local_directory(path: str, root: str, bad: BadRecords) -> list[CorpusFile]:
    """A directory in one C++ listing (pyarrow: sizes, times, special files typed 'unknown'), plus a
    scan for the symbolic links the listing leaves out when they dangle. A 10,000-file corpus then
    costs milliseconds, not a Path object and several system calls per file. Files whose permissions
    forbid reading are found by the reader, which counts them the same way."""
    entries: list[tuple[str, CorpusFile | str]] = []
    for found in pafs.LocalFileSystem().get_file_info(pafs.FileSelector(root, recursive=True)):
        name = found.path[len(root) + 1:]
        if name.startswith(".") or "/." in name:  # hidden, or below a hidden directory
            continue
        if found.is_file:
            entries.append((found.path, CorpusFile(found.path, name, found.size, found.mtime_ns)))
        elif found.type == pafs.FileType.Unknown:  # a FIFO, socket or device: never opened
            entries.append((found.path, "not a regular file"))
    entries += [(link, f"dangling link to {os.readlink(link)}") for link in _dangling_links(root)]
    if not entries:
        raise ConfigError(f"data.path: no files match '{path}'")
    files = []
    for location, entry in sorted(entries, key=lambda item: item[0]):
        if isinstance(entry, str):
            bad.add("unreadable_file", location, entry)
        else:
            files.append(entry)
    return files


def _dangling_links(root: str) -> list[str]:
    found, directories = [], [root]
    while directories:
        with os.scandir(directories.pop()) as scan:
            for entry in scan:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    directories.append(entry.path)
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    found.append(entry.path)
    return found


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be read, or None, from metadata alone: special files are never opened
    (opening a FIFO with no writer would block forever), and no file is opened just to check it."""
    if path.is_symlink() and not path.exists():
        return f"dangling link to {os.readlink(path)}"
    if not path.is_file():
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "Permission denied"
    return None


def _common_root(paths: list[Path]) -> Path:
    if not paths:
        return Path("/")
    parents = [p.parent for p in paths]
    root = parents[0]
    while not all(p.is_relative_to(root) for p in parents):
        root = root.parent
    return root


@dataclass(frozen=True)
class Piece:
    file: CorpusFile
    start: int
    end: int


def _container_setting(cfg: DataConfig) -> str:
    return cfg.file_type if cfg.reads_records else cfg.format


def container(cfg: DataConfig, name: str) -> str:
    """How a corpus file is read: text (one document), jsonl, parquet or hf (Arrow stream shards)."""
    setting = _container_setting(cfg)
    if setting != "auto":
        return setting
    return "parquet" if name.endswith(".parquet") else "hf" if name.endswith(".arrow") else "jsonl"


def chunk_size(files: list[CorpusFile], chunk_bytes: int, workers: int) -> int:
    """`chunk_bytes`, or less when the corpus would otherwise make too few chunks to keep every
    tokenizer actor busy (a 30 MB corpus in one 32 MiB chunk would run on one actor). Chunking never
    changes the blocks, so it can follow the cluster."""
    total = sum(f.size for f in files)
    return max(MIN_CHUNK_BYTES, min(chunk_bytes, -(-total // (BLOCKS_PER_WORKER * workers))))


def plan_chunks(files: list[CorpusFile], cfg: DataConfig, chunk_bytes: int) -> list[list[Piece]]:
    """Consecutive pieces grouped into chunks of about `chunk_bytes`; only JSONL files are cut (a
    text file is one document, a parquet or Arrow file is streamed by record batches)."""
    chunks: list[list[Piece]] = [[]]
    filled = 0
    for corpus_file in files:
        jsonl = container(cfg, corpus_file.name) == "jsonl"
        cuts = range(0, corpus_file.size, chunk_bytes) if jsonl and corpus_file.size > chunk_bytes else [0]
        for start in cuts:
            end = min(corpus_file.size, start + chunk_bytes) if jsonl else corpus_file.size
            if chunks[-1] and filled + (end - start) > chunk_bytes:
                chunks.append([])
                filled = 0
            chunks[-1].append(Piece(corpus_file, start, end))
            filled += end - start
    return [chunk for chunk in chunks if chunk]


class SplitRule:
    """Decides train or eval for a document, from its file name or its text, never its position."""

    def __init__(self, cfg: SplitConfig):
        self.cfg = cfg
        self.pattern = re.compile(cfg.path_pattern)

    @property
    def reads_text(self) -> bool:
        return self.cfg.rule == "hash"

    def check_file_name(self, file_name: str) -> None:
        """Run on the driver for every file before Ray reads, so __call__ never raises in a task."""
        if self.cfg.rule == "path_number":
            self._number(file_name)

    def __call__(self, file_name: str, text: str) -> str:
        if self.cfg.rule == "path_number":
            return "eval" if self._number(file_name) >= self.cfg.eval_from else "train"
        key = file_name if self.cfg.rule == "path_hash" else text
        digest = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
        return "eval" if digest / 2**64 < self.cfg.eval_fraction else "train"

    def _number(self, file_name: str) -> float:
        match = self.pattern.search(file_name)
        try:
            return float(match.group(1))
        except (AttributeError, IndexError, ValueError):  # no match, no group, not a number
            raise ConfigError(f"data.split.path_pattern: '{self.cfg.path_pattern}' does not match a number in "
                              f"'{file_name}'") from None
