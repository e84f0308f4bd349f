"""Streaming record readers, one byte range ("piece") at a time, in bounded memory.

- text: a file is one document. A file above `data.max_document_bytes` is a bad record from its size
  alone, so no read holds more than that.
- jsonl: the piece [start, end) owns every line that starts inside it: a piece that starts mid-line
  skips to the next line, and its last line may run past `end`. Lines are read in blocks, and a line
  longer than `max_document_bytes` is skipped as it streams by instead of being held.
- parquet / hf (Arrow stream files): streamed by record batches, only the text column.
- the example formats (chat, instruction, prompt_completion) read JSON lines, parquet or Arrow files
  (`corpus.container`) and yield each record's fields whole; `pipeline.data.examples` judges them.

A bad record is yielded with its reason; the reader never raises for one. A problem that is the
config's (the text column missing) raises `FileProblem`, which the task returns to the driver.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.data.corpus import container

READ_BLOCK = 1 << 20


class FileProblem(Exception):
    """A config problem a file's contents reveal; the message is the one-line error for the user."""


@dataclass(frozen=True)
class Record:
    index: int  # jsonl: line number within the piece (1-based); parquet/hf: row; text: 0
    text: str
    bad: str = ""  # a reason from bad_records.REASONS, or "" for a good document
    detail: str = ""
    fields: dict | None = None  # an example format's record (its text: the JSON line, or "" from a table)


class PieceReader:
    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.examples = cfg.reads_records
        self.text_field = cfg.text_field
        self.max_bytes = cfg.max_document_bytes
        self.lines = 0  # lines the last JSONL piece owned, blank ones included

    def records(self, location: str, name: str, size: int, start: int, end: int) -> Iterator[Record]:
        self.lines = 0
        fs, path = storage.filesystem(location)
        kind = container(self.cfg, name)
        try:
            if kind == "text":
                yield self._text_file(fs, path, size)
            elif kind == "jsonl":
                with fs.open_input_file(path) as handle:
                    yield from self._jsonl(handle, start, end)
            else:
                yield from self._table(fs, path, name, kind)
        except OSError as error:  # unreadable since it was listed (permissions, deleted, storage error)
            yield Record(0, "", "unreadable_file", getattr(error, "strerror", None) or str(error).split("\n")[0])

    def _text_file(self, fs, path: str, size: int) -> Record:
        if size > self.max_bytes:
            return Record(0, "", "too_large", f"{size:,} bytes")
        with fs.open_input_stream(path) as stream:
            return self._decoded(0, stream.read())

    def _decoded(self, index: int, data: bytes) -> Record:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Record(index, "", "not_utf8", f"byte {exc.start}")
        return Record(index, text) if text.strip() else Record(index, "", "empty")

    def _jsonl(self, handle, start: int, end: int) -> Iterator[Record]:
        for number, line, size in self._owned_lines(handle, start, end):
            self.lines = number
            if size > self.max_bytes:
                yield Record(number, "", "too_large", f"{size:,} bytes")
            elif line.strip():  # blank lines separate records; they are not records
                yield self._json_record(number, line)

    def _owned_lines(self, handle, start: int, end: int) -> Iterator[tuple[int, bytes, int]]:
        """(number within the piece, line without its newline, its size) for each line starting in
        [start, end). An oversized line comes back empty, with its size."""
        position = start
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":  # mid-line: that line belongs to the previous piece
                position = self._skip_line(handle, start, end)
        handle.seek(position)
        number, pending, size, buffer = 0, [], 0, b""
        while position < end:
            if not buffer:
                buffer = handle.read(READ_BLOCK)
                if not buffer:
                    break
            newline = buffer.find(b"\n")
            part = buffer if newline < 0 else buffer[:newline]
            size += len(part)
            if size <= self.max_bytes:
                pending.append(part)
            if newline < 0:
                buffer = b""
                continue
            buffer = buffer[newline + 1:]
            number += 1
            yield number, b"".join(pending) if size <= self.max_bytes else b"", size
            position += size + 1
            pending, size = [], 0
            if position >= end:
                return
        if size:  # a last line without a newline
            yield number + 1, b"".join(pending) if size <= self.max_bytes else b"", size

    @staticmethod
    def _skip_line(handle, start: int, end: int) -> int:
        """The position after the next newline at or after `start`, or `end` if there is none before
        it: then no line starts in the piece, and scanning on (through one very long line, piece after
        piece) would make reading a file quadratic in its pieces."""
        handle.seek(start)
        position = start
        while position < end and (block := handle.read(min(READ_BLOCK, end - position))):
            newline = block.find(b"\n")
            if newline >= 0:
                return position + newline + 1
            position += len(block)
        return end

    def _json_record(self, number: int, line: bytes) -> Record:
        decoded = self._decoded(number, line)
        if decoded.bad:
            return decoded
        try:
            record = json.loads(decoded.text)
        except ValueError as exc:
            return Record(number, "", "invalid_json", str(exc))
        if not isinstance(record, dict):
            return Record(number, "", "invalid_json", f"a JSON {type(record).__name__}, not an object")
        if self.examples:  # the line itself stays the text: what a hash split hashes
            return Record(number, decoded.text, fields=record)
        text = record.get(self.text_field)
        if not isinstance(text, str):
            return Record(number, "", "missing_field", f"no string field '{self.text_field}'")
        return Record(number, text) if text.strip() else Record(number, "", "empty")

    def _table(self, fs, path: str, name: str, kind: str) -> Iterator[Record]:
        batches = self._batches(fs, path, name, kind)
        index = 0
        for batch in batches:
            if self.examples:
                for row in batch.to_pylist():
                    yield Record(index, "", fields=row)
                    index += 1
                continue
            for text in batch.column(0).to_pylist():
                size = len(text.encode()) if text is not None else 0
                if size > self.max_bytes:
                    yield Record(index, "", "too_large", f"{size:,} bytes")
                elif text and text.strip():
                    yield Record(index, text)
                else:
                    yield Record(index, "", "empty")
                index += 1

    def _batches(self, fs, path: str, name: str, kind: str) -> Iterator[pa.RecordBatch]:
        import pyarrow.parquet as pq

        if kind == "parquet":
            parquet = pq.ParquetFile(fs.open_input_file(path))
            columns = self._columns(parquet.schema_arrow, name)
            yield from parquet.iter_batches(batch_size=1024, columns=columns)
            return
        with fs.open_input_stream(path) as source:  # HF save_to_disk shards: Arrow IPC streams
            reader = pa.ipc.open_stream(source)
            columns = self._columns(reader.schema, name)
            for batch in reader:
                yield batch.select(columns)

    def _columns(self, schema: pa.Schema, name: str) -> list[str]:
        """The columns a table is read for: the text column, or the example format's fields that
        the file has (a missing one then makes each record bad, as in JSON lines)."""
        if not self.examples:
            check_text_column(schema, self.text_field, name)
            return [self.text_field]
        wanted = example_fields(self.cfg)
        present = [column for column in wanted if column in schema.names]
        if not present:
            raise FileProblem(f"data.fields: {name} has none of the columns {', '.join(wanted)} "
                              f"(columns: {', '.join(schema.names)})")
        return present


def check_text_column(schema: pa.Schema, text_field: str, name: str) -> None:
    if text_field not in schema.names:
        raise FileProblem(f"data.text_field: '{text_field}' is not a column of {name} "
                          f"(columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise FileProblem(f"data.text_field: column '{text_field}' of {name} holds {kind}, not text")


def example_fields(cfg: DataConfig) -> list[str]:
    """The record fields an example or labelled format reads."""
    names = cfg.fields
    return {"chat": [names.messages], "instruction": [names.instruction, names.input, names.output],
            "prompt_completion": [names.prompt, names.completion], "labelled_text": [cfg.text_field, cfg.label_field],
            "tagged_tokens": [names.tokens, names.tags]}[cfg.format]
