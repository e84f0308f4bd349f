"""Read a corpus into a Ray Dataset of documents: {doc_key, text, split}.

Every format goes through `read_binary_files` and a per-file parser, so each document gets a
stable key (file, line or row) and the order is the sorted file order, whatever the parallelism.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from pipeline.config import ConfigError, DataConfig, SplitConfig, expand_files

SPLITS = ("train", "eval")
# Reading and parsing is light next to tokenizing; a fractional request lets it run beside the
# tokenizer actors on a small machine.
READ_TASK_CPUS = 0.5


def corpus_files(cfg: DataConfig) -> list[Path]:
    files = [p.resolve() for p in expand_files(cfg.path, "data.path")]
    if cfg.format == "hf":  # a save_to_disk directory: the Arrow shards hold the rows
        files = [p for p in files if p.suffix == ".arrow"]
        if not files:
            raise ConfigError(f"data.path: '{cfg.path}' holds no .arrow files (is it a save_to_disk directory?)")
    return files


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
        self.split_rule = SplitRule(cfg.split)
        self.root = root

    def __call__(self, row: dict) -> list[dict]:
        path = Path(row["path"])
        rel = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        return [{"doc_key": key, "text": text, "split": self.split_rule(path.name, text)}
                for key, text in self._documents(rel, row["bytes"])
                if text.strip()]

    def _documents(self, rel: str, data: bytes) -> Iterator[tuple[str, str]]:
        if self.format == "text":
            yield rel, _decode(data, rel)
        elif self.format == "jsonl":
            for number, line in enumerate(data.splitlines(), start=1):
                if line.strip():
                    yield f"{rel}:{number}", self._field(json.loads(line), f"{rel}:{number}")
        else:
            table = _read_table(self.format, data)
            if self.text_field not in table.column_names:
                raise ConfigError(f"data.text_field: '{self.text_field}' is not a column of {rel} "
                                  f"(columns: {', '.join(table.column_names)})")
            for index, text in enumerate(table.column(self.text_field).to_pylist()):
                yield f"{rel}#{index}", text or ""

    def _field(self, record: object, where: str) -> str:
        if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
            raise ConfigError(f"data.text_field: record {where} has no string field '{self.text_field}'")
        return record[self.text_field]


class SplitRule:
    """Decides train or eval for a document, from its file name or its text, never its position."""

    def __init__(self, cfg: SplitConfig):
        self.cfg = cfg
        self.pattern = re.compile(cfg.path_pattern)

    def __call__(self, file_name: str, text: str) -> str:
        if self.cfg.rule == "path_number":
            match = self.pattern.search(file_name)
            if not match:
                raise ConfigError(f"data.split.path_pattern: '{self.cfg.path_pattern}' does not match '{file_name}'")
            return "eval" if float(match.group(1)) >= self.cfg.eval_from else "train"
        digest = int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")
        return "eval" if digest / 2**64 < self.cfg.eval_fraction else "train"


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not valid UTF-8 at byte {exc.start}") from None


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
