"""Read a corpus into a Ray Dataset of documents: {doc_key, text, split, bad, detail}.

Every format goes through `read_binary_files` and a per-file parser, so each document gets a
stable key (file, line or row) and the order is the sorted file order, whatever the parallelism.
A bad record becomes a row with `bad` set to its reason (see bad_records.py) instead of an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from pipeline.config import ConfigError, DataConfig, SplitConfig, expand_files, resolve_path
from pipeline.data.bad_records import BadRecords

SPLITS = ("train", "eval")
# Reading and parsing is light next to tokenizing; a fractional request lets it run beside the
# tokenizer actors on a small machine.
READ_TASK_CPUS = 0.5


def corpus_files(cfg: DataConfig, bad: BadRecords) -> list[Path]:
    """The readable corpus files, in order. Unreadable ones (no permission, a dangling link, a
    special file) are bad records of their own, counted or failed on here, before Ray reads.
    Config problems a file reveals (no text column, a file name the split rule cannot place) are
    raised here too: raised inside a Ray task they would reach the user as a worker traceback."""
    listed = _unlisted_entries(cfg.path)
    try:
        listed += [p.resolve() for p in expand_files(cfg.path, "data.path")]
    except ConfigError:
        if not listed:
            raise
    if cfg.format == "hf":  # a save_to_disk directory: the Arrow shards hold the rows
        listed = [p for p in listed if p.suffix == ".arrow"]
        if not listed:
            raise ConfigError(f"data.path: '{cfg.path}' holds no .arrow files (is it a save_to_disk directory?)")
    files = []
    for path in sorted(listed):
        problem = _unreadable(path)
        if problem:
            bad.add("unreadable_file", str(path), problem)
        else:
            files.append(path)
    split_rule = SplitRule(cfg.split)
    for path in files:
        split_rule.check_file_name(path.name)
        if cfg.format in ("parquet", "hf"):
            _check_text_column(cfg, path)
    return files


def _unlisted_entries(path: str) -> list[Path]:
    """Entries of a corpus directory that `expand_files` leaves out because they are not regular
    files although they look like corpus files: dangling links and special files. Their directory
    is resolved like the listed files' (the link itself is kept), so the sorted order is the same."""
    root = Path(resolve_path(path))
    if not root.is_dir():
        return []
    return [p.parent.resolve() / p.name for p in root.rglob("*")
            if not p.name.startswith(".") and not p.is_dir() and not p.is_file()]


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be read, or None. Special files are never opened: opening a FIFO with no
    writer would block the driver forever."""
    if path.is_symlink() and not path.exists():
        return f"dangling link to {os.readlink(path)}"
    if not path.is_file():
        return "not a regular file"
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _check_text_column(cfg: DataConfig, path: Path) -> None:
    import pyarrow.parquet as pq

    if cfg.format == "parquet":
        schema = pq.read_schema(path)
    else:
        with pa.memory_map(str(path)) as source:
            schema = pa.ipc.open_stream(source).schema
    if cfg.text_field not in schema.names:
        raise ConfigError(f"data.text_field: '{cfg.text_field}' is not a column of {path} "
                          f"(columns: {', '.join(schema.names)})")
    kind = schema.field(cfg.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"data.text_field: column '{cfg.text_field}' of {path} holds {kind}, not text")


def read_documents(cfg: DataConfig, files: list[Path]):
    """A Ray Dataset with one row per document, in a deterministic order."""
    import ray.data

    root = _common_root(files)
    parser = DocumentParser(cfg, root)
    ds = ray.data.read_binary_files([str(p) for p in files], include_paths=True, num_cpus=READ_TASK_CPUS,
                                    override_num_blocks=read_tasks(files))
    return ds.flat_map(parser, num_cpus=READ_TASK_CPUS)


def read_tasks(files: list[Path], bytes_per_task: int = 64 << 20, minimum: int = 4) -> int:
    """Few, large read tasks: each costs a worker start-up that dwarfs reading a small file, so
    Ray's default of one task per few files made reading slower than tokenizing."""
    total = sum(p.stat().st_size for p in files)
    return max(1, min(len(files), max(minimum, total // bytes_per_task)))


class DocumentParser:
    """Picklable per-file parser: one binary-file row in, its documents out."""

    def __init__(self, cfg: DataConfig, root: Path):
        self.format = cfg.format
        self.text_field = cfg.text_field
        self.max_bytes = cfg.max_document_bytes
        self.split_rule = SplitRule(cfg.split)
        self.root = root

    def __call__(self, row: dict) -> list[dict]:
        path = Path(row["path"])
        rel = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        rows = []
        for key, text, bad, detail in self._documents(rel, row["bytes"]):
            if not bad and not text.strip():
                bad = "empty"
            split = "" if bad else self.split_rule(path.name, text)
            rows.append({"doc_key": key, "text": "" if bad else text, "split": split, "bad": bad, "detail": detail})
        return rows

    def _documents(self, rel: str, data: bytes) -> Iterator[tuple[str, str, str, str]]:
        """(key, text, bad reason or "", detail) per record."""
        if self.format == "text":
            yield (rel, *self._text(data))
        elif self.format == "jsonl":
            for number, line in enumerate(data.splitlines(), start=1):
                if line.strip():  # blank lines separate records; they are not records
                    yield (f"{rel}:{number}", *self._json_record(line))
        else:
            for index, text in enumerate(_read_table(self.format, data).column(self.text_field).to_pylist()):
                size = len(text.encode()) if text is not None else 0
                if size > self.max_bytes:
                    yield f"{rel}#{index}", "", "too_large", f"{size:,} bytes"
                else:
                    yield f"{rel}#{index}", text or "", "", ""

    def _text(self, data: bytes) -> tuple[str, str, str]:
        if len(data) > self.max_bytes:
            return "", "too_large", f"{len(data):,} bytes"
        try:
            return data.decode("utf-8"), "", ""
        except UnicodeDecodeError as exc:
            return "", "not_utf8", f"byte {exc.start}"

    def _json_record(self, line: bytes) -> tuple[str, str, str]:
        text, bad, detail = self._text(line)
        if bad:
            return text, bad, detail
        try:
            record = json.loads(text)
        except ValueError as exc:
            return "", "invalid_json", str(exc)
        if not isinstance(record, dict):
            return "", "invalid_json", f"a JSON {type(record).__name__}, not an object"
        if not isinstance(record.get(self.text_field), str):
            return "", "missing_field", f"no string field '{self.text_field}'"
        return record[self.text_field], "", ""


class SplitRule:
    """Decides train or eval for a document, from its file name or its text, never its position."""

    def __init__(self, cfg: SplitConfig):
        self.cfg = cfg
        self.pattern = re.compile(cfg.path_pattern)

    def check_file_name(self, file_name: str) -> None:
        """Run on the driver for every file before Ray reads, so __call__ never raises in a task."""
        if self.cfg.rule == "path_number":
            self._number(file_name)

    def __call__(self, file_name: str, text: str) -> str:
        if self.cfg.rule == "path_number":
            return "eval" if self._number(file_name) >= self.cfg.eval_from else "train"
        digest = int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")
        return "eval" if digest / 2**64 < self.cfg.eval_fraction else "train"

    def _number(self, file_name: str) -> float:
        match = self.pattern.search(file_name)
        try:
            return float(match.group(1))
        except (AttributeError, IndexError, ValueError):  # no match, no group, not a number
            raise ConfigError(f"data.split.path_pattern: '{self.cfg.path_pattern}' does not match a number in "
                              f"'{file_name}'") from None


def _read_table(fmt: str, data: bytes) -> pa.Table:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data))
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()  # HF save_to_disk shards


def _common_root(files: list[Path]) -> Path:
    parents = [p.resolve().parent for p in files]
    root = parents[0]
    while not all(p.is_relative_to(root) for p in parents):
        root = root.parent
    return root
