"""The packed cache is flat token files; a block is addressed by its sample id.

A split's token stream is its chunk files (little-endian int32, EOS after every document) in chunk
order. Block `k` is tokens `[k·L, (k+1)·L)` of that stream, so its sample id is its address: there is
no packing pass over the tokens, and a reader fetches any block with one range read (two where it
crosses a file border), from local disk or object storage. The final partial block is not a block.

An example stream (chat, instruction, prompt_completion) holds (id, label) int32 pairs. Packed by
document, block `k` is examples `[first[k], first[k+1])` of the stream (`PackPlan`, computed once
from the example lengths): whole, consecutive examples, so again one range read; the block is padded
to L with labels -100, and its position ids restart at every example (and at the padding), which is
what keeps attention inside an example (transformers derives the block-causal mask from them).
"""

from __future__ import annotations

import collections
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.config import is_uri

TOKEN_BYTES = 4  # int32
IGNORE = -100  # the label of a token not trained on
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
class PackPlan:
    """Document packing of one split: example i is tokens [starts[i], starts[i+1]) of the stream and
    block k holds examples [first[k], first[k+1])."""

    starts: np.ndarray  # int64, examples + 1
    first: np.ndarray  # int64, blocks + 1

    @classmethod
    def next_fit(cls, lengths: np.ndarray, seq_len: int, one_per_block: bool = False) -> PackPlan:
        """Examples in stream order, each block filled until the next example would not fit (as
        torchtune packs): the blocks depend on the lengths alone, never on how the corpus was chunked."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if one_per_block:
            first = np.arange(len(lengths) + 1, dtype=np.int64)
        else:
            first, filled = [0], 0
            for index, length in enumerate(lengths.tolist()):
                if filled + length > seq_len:
                    first.append(index)
                    filled = 0
                filled += length
            first = np.asarray(first + [len(lengths)] if len(lengths) else [0], dtype=np.int64)
        return cls(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), first)

    @property
    def blocks(self) -> int:
        return len(self.first) - 1

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, starts=self.starts, first=self.first)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PackPlan:
        arrays = np.load(io.BytesIO(data))
        return cls(arrays["starts"], arrays["first"])


@dataclass(frozen=True)
class TokenBlocks:
    """Blocks as the model takes them."""

    input_ids: np.ndarray  # int32 [n, L]
    labels: np.ndarray | None  # int32 [n, L]; None: the ids themselves (raw text)
    position_ids: np.ndarray | None  # int32 [n, L]; None: 0..L-1 in every block


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

    def __init__(self, files: list[TokenFile], seq_len: int, labelled: bool = False, plan: PackPlan | None = None,
                 pad_id: int = 0):
        self.files = files
        self.seq_len = seq_len
        self.values = 2 if labelled else 1  # int32 values per token: (id, label) in an example stream
        self.plan, self.pad_id = plan, pad_id
        self.starts = np.concatenate([[0], np.cumsum([f.tokens for f in files])]).astype(np.int64)
        self.blocks = plan.blocks if plan is not None else int(self.starts[-1]) // seq_len
        self.samples_read = 0
        self._handles: collections.OrderedDict[int, object] = collections.OrderedDict()  # least recent first
        self._lock = threading.Lock()
        # Local reads are page-cache copies; range requests to a bucket wait on the network, so overlap them.
        self._pool = ThreadPoolExecutor(REMOTE_READS, thread_name_prefix="block-reads") \
            if files and is_uri(files[0].location) else None

    def read(self, sample_ids) -> np.ndarray:
        """The blocks' token ids, as an int32 array [len(sample_ids), seq_len], in that order."""
        return self.read_blocks(sample_ids).input_ids

    def read_blocks(self, sample_ids) -> TokenBlocks:
        """The blocks of `sample_ids` (ids, and labels and positions for an example stream), in that order."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        if len(sample_ids) and (sample_ids.min() < 0 or sample_ids.max() >= self.blocks):
            raise IndexError(f"sample ids must lie in [0, {self.blocks}); got {sample_ids.min()}..{sample_ids.max()}")
        ids = [int(i) for i in sample_ids]
        blocks = list(self._pool.map(self._block, ids)) if self._pool and len(ids) > 1 else [self._block(i) for i in ids]
        with self._lock:
            self.samples_read += len(ids)
        def rows(part: int) -> np.ndarray:
            return np.stack([block[part] for block in blocks]) if blocks else np.zeros((0, self.seq_len), np.int32)

        return TokenBlocks(rows(0), rows(1) if self.values == 2 else None, rows(2) if self.plan is not None else None)

    def _block(self, sample_id: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(ids, labels, positions) of one block."""
        if self.plan is None:
            values = self._tokens(sample_id * self.seq_len, (sample_id + 1) * self.seq_len)
            return values[:, 0], values[:, 1] if self.values == 2 else None, None
        first, last = int(self.plan.first[sample_id]), int(self.plan.first[sample_id + 1])
        starts = self.plan.starts[first:last + 1]
        values = self._tokens(int(starts[0]), int(starts[-1]))
        used = len(values)
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        labels = np.full(self.seq_len, IGNORE, dtype=np.int32)
        ids[:used], labels[:used] = values[:, 0], values[:, 1]
        # Each example's positions count from its own start; the padding is one more segment.
        segment_starts = np.append(starts[:-1] - starts[0], used)
        lengths = np.diff(np.append(segment_starts, self.seq_len))
        positions = np.arange(self.seq_len) - np.repeat(segment_starts, lengths)
        return ids, labels, positions.astype(np.int32)

    def _tokens(self, begin: int, end: int) -> np.ndarray:
        """Tokens [begin, end) of the stream, as int32 [end - begin, values]."""
        record = TOKEN_BYTES * self.values
        index = int(np.searchsorted(self.starts, begin, side="right")) - 1
        parts = []
        while begin < end:
            file_start, file_end = int(self.starts[index]), int(self.starts[index + 1])
            hi = min(end, file_end)
            data = self._handle(index).read_at((hi - begin) * record, (begin - file_start) * record)
            parts.append(np.frombuffer(data, dtype="<i4"))
            begin, index = hi, index + 1
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return flat.reshape(-1, self.values)

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
