"""The packed cache is flat token files; a block is addressed by its sample id.

A split's token stream is its chunk files (little-endian int32, EOS after every document) in chunk
order. Block `k` is tokens `[k·L, (k+1)·L)` of that stream, so its sample id is its address: there is
no packing pass over the tokens, and a reader fetches any block with one range read (two where it
crosses a file border), from local disk or object storage. The final partial block is not a block.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.config import is_uri

TOKEN_BYTES = 4  # int32
OPEN_FILES = 64  # handles kept open per reader: a shuffled epoch touches every chunk file
REMOTE_READS = 8  # concurrent range requests per `read` from object storage


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
        self._handles: collections.OrderedDict[int, object] = collections.OrderedDict()  # least recent first
        self._lock = threading.Lock()
        # Local reads are page-cache copies; range requests to a bucket wait on the network, so overlap them.
        self._pool = ThreadPoolExecutor(REMOTE_READS, thread_name_prefix="block-reads") \
            if files and is_uri(files[0].location) else None

    def read(self, sample_ids) -> np.ndarray:
        """The blocks of `sample_ids`, as an int32 array [len(sample_ids), seq_len], in that order."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        if len(sample_ids) and (sample_ids.min() < 0 or sample_ids.max() >= self.blocks):
            raise IndexError(f"sample ids must lie in [0, {self.blocks}); got {sample_ids.min()}..{sample_ids.max()}")
        ids = [int(i) for i in sample_ids]
        blocks = list(self._pool.map(self._block, ids)) if self._pool and len(ids) > 1 else [self._block(i) for i in ids]
        out = np.empty((len(ids), self.seq_len), dtype=np.int32)
        for row, block in enumerate(blocks):
            out[row] = block
        with self._lock:
            self.samples_read += len(ids)
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
            if handle is not None:
                self._handles.move_to_end(index)
                return handle
        fs, path = storage.filesystem(self.files[index].location)
        handle = fs.open_input_file(path)  # outside the lock: a remote open is a request
        with self._lock:
            if index in self._handles:  # another thread opened it meanwhile
                handle.close()
                return self._handles[index]
            self._handles[index] = handle
            while len(self._handles) > OPEN_FILES:
                # Not closed here: a read in another thread may still use it. pyarrow closes a file
                # when its last reference goes.
                self._handles.popitem(last=False)
            return handle

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True)
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()
