"""Packing: concatenate documents (each ending in EOS) and cut the stream into seq_len blocks.

Pure numpy and no Ray, so its guarantees are easy to test: every token is kept in order, only the
final partial block is dropped, and sample_id is the block's index in its split's stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class BlockPacker:
    """Streams tokens in, writes full blocks to parquet shards as {sample_id, input_ids}."""

    def __init__(self, out_dir: Path, seq_len: int, blocks_per_file: int = 4096):
        self.out_dir = out_dir
        self.seq_len = seq_len
        self.blocks_per_file = blocks_per_file
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.documents = 0
        self.tokens = 0
        self.blocks = 0
        self.files = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def add_document(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self.tokens += len(tokens)
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens >= self.seq_len * self.blocks_per_file:
            self._flush(final=False)

    def close(self) -> dict:
        """Write what is left in full blocks; returns the split's statistics."""
        self._flush(final=True)
        return {"documents": self.documents, "tokens": self.tokens, "blocks": self.blocks,
                "dropped_tail_tokens": self.pending_tokens, "files": self.files}

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        stream = np.concatenate(self.pending)
        n_blocks = len(stream) // self.seq_len
        while n_blocks >= (1 if final else self.blocks_per_file):
            take = min(n_blocks, self.blocks_per_file)
            self._write(stream[: take * self.seq_len].reshape(take, self.seq_len))
            stream = stream[take * self.seq_len:]
            n_blocks -= take
        self.pending = [stream] if len(stream) else []
        self.pending_tokens = len(stream)

    def _write(self, blocks: np.ndarray) -> None:
        sample_ids = np.arange(self.blocks, self.blocks + len(blocks), dtype=np.int64)
        input_ids = pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1).astype(np.int32)), self.seq_len)
        table = pa.table({"sample_id": sample_ids, "input_ids": input_ids})
        pq.write_table(table, self.out_dir / f"part-{self.files:05d}.parquet", row_group_size=1024)
        self.blocks += len(blocks)
        self.files += 1
