"""The packed cache is flat token files; a block is addressed by its sample id.

A split's token stream is its chunk files (little-endian int32, EOS after every document) in chunk
order. Block `k` is tokens `[k·L, (k+1)·L)` of that stream, so its sample id is its address: there is
no packing pass over the tokens, and a reader fetches any block with one range read (two where it
crosses a file border), from local disk or object storage. The final partial block is not a block.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from pipeline import storage

TOKEN_BYTES = 4  # int32


@dataclass(frozen=True)
class TokenFile:
    """One chunk's tokens of one split, as meta.json lists it."""

    location: str
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitLayout:
    tokens: int
    blocks: int
    dropped_tail_tokens: int


def layout(files: list[TokenFile], seq_len: int) -> SplitLayout:
    tokens = sum(f.tokens for f in files)
    return SplitLayout(tokens, tokens // seq_len, tokens % seq_len)


class BlockReader:
    """Random access to one split's blocks by sample id. Thread-safe: a prefetcher may call `read`
    from several threads. `samples_read` counts every block fetched (what a resume test checks)."""

    def __init__(self, files: list[TokenFile], seq_len: int):
        self.files = files
        self.seq_len = seq_len
        self.starts = np.concatenate([[0], np.cumsum([f.tokens for f in files])]).astype(np.int64)
        self.blocks = int(self.starts[-1]) // seq_len
        self.samples_read = 0
        self._handles: dict[int, object] = {}
        self._lock = threading.Lock()

    def read(self, sample_ids) -> np.ndarray:
        """The blocks of `sample_ids`, as an int32 array [len(sample_ids), seq_len], in that order."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        if len(sample_ids) and (sample_ids.min() < 0 or sample_ids.max() >= self.blocks):
            raise IndexError(f"sample ids must lie in [0, {self.blocks}); got {sample_ids.min()}..{sample_ids.max()}")
        out = np.empty((len(sample_ids), self.seq_len), dtype=np.int32)
        for row, sample_id in enumerate(sample_ids):
            out[row] = self._block(int(sample_id))
        with self._lock:
            self.samples_read += len(sample_ids)
        return out

    def _block(self, sample_id: int) -> np.ndarray:
        begin, end = sample_id * self.seq_len, (sample_id + 1) * self.seq_len
        index = int(np.searchsorted(self.starts, begin, side="right")) - 1
        parts = []
        while begin < end:
            file_start, file_end = int(self.starts[index]), int(self.starts[index + 1])
            hi = min(end, file_end)
            data = self._handle(index).read_at((hi - begin) * TOKEN_BYTES, (begin - file_start) * TOKEN_BYTES)
            parts.append(np.frombuffer(data, dtype="<i4"))
            begin, index = hi, index + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _handle(self, index: int):
        with self._lock:
            handle = self._handles.get(index)
            if handle is None:
                fs, path = storage.filesystem(self.files[index].location)
                handle = self._handles[index] = fs.open_input_file(path)
            return handle

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()
