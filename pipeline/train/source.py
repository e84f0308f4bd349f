"""What one rank trains on: its slice of every tick's global batch, read ahead in the background.

The data -> train contract is `SampleOrder` (which sample ids form tick t's global batch, the same
for any world size) plus `BlockReader` (a block by its sample id). Rank r of W takes positions
[r·B/W, (r+1)·B/W) of the global batch and cuts them into micro batches, so the samples of a tick,
and therefore its loss and gradient, do not depend on W. A resume at tick k asks for tick k first:
nothing before it is read.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.blocks import IGNORE, BlockReader
from pipeline.data.order import SampleOrder

READ_THREADS = 4  # concurrent block reads: range requests to object storage overlap


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # int64 [micro, seq_len]
    sample_ids: torch.Tensor  # int64 [micro]: what the noise is keyed on
    labels: torch.Tensor | None = None  # int64, -100 where not trained; None: the input ids (raw text)
    position_ids: torch.Tensor | None = None  # int64, restarting at each packed example; None: 0..L-1

    @property
    def targets(self) -> int:
        """Tokens the loss is over: every labelled token but a row's first (nothing predicts it)."""
        if self.labels is None:
            return self.input_ids.numel() - self.input_ids.shape[0]
        return int((self.labels[:, 1:] != IGNORE).sum())

    def example_lengths(self) -> torch.Tensor:
        """Each token's example length L, int64 [micro, seq_len], 0 on padding: what NEFTune scales by.

        Blocks packed by document (or one example per block) restart their position ids at every
        example and once more at the padding, which is the last segment and has no labelled token
        (every example has one: an example without a response is a bad record). Raw text and naive
        packing keep no example bounds, so there every token's L is the block length."""
        rows, seq_len = self.input_ids.shape
        if self.position_ids is None:
            return torch.full((rows, seq_len), seq_len, dtype=torch.int64)
        segment = torch.cumsum(self.position_ids == 0, dim=1) - 1  # each token's segment in its row
        per_segment = torch.zeros_like(segment).scatter_add_(1, segment, torch.ones_like(segment))
        labelled = torch.zeros_like(segment).scatter_add_(1, segment, (self.labels != IGNORE).to(torch.int64))
        last = segment[:, -1:]
        padding = (segment == last) & (labelled.gather(1, last) == 0)
        return torch.where(padding, 0, per_segment.gather(1, segment))

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids.to(device)}
        inputs["labels"] = inputs["input_ids"] if self.labels is None else self.labels.to(device)
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids.to(device)
        return inputs


def micro_batches(reader: BlockReader, sample_ids: np.ndarray, micro: int) -> list[MicroBatch]:
    blocks = reader.read_blocks(sample_ids)

    def rows(values: np.ndarray | None, i: int) -> torch.Tensor | None:
        return None if values is None else torch.from_numpy(values[i:i + micro].astype(np.int64))

    return [MicroBatch(rows(blocks.input_ids, i), torch.from_numpy(sample_ids[i:i + micro].astype(np.int64)),
                       rows(blocks.labels, i), rows(blocks.position_ids, i))
            for i in range(0, len(sample_ids), micro)]


class TickBatches:
    """This rank's micro batches for each tick; `ahead` ticks are read in the background so that
    training waits on input only when storage is slower than a tick."""

    def __init__(self, reader: BlockReader, order: SampleOrder, rank: int, world: int, micro: int,
                 end_tick: int, ahead: int = 2):
        if order.global_batch % (world * micro):
            raise ValueError(f"a global batch of {order.global_batch} does not split into {world} ranks x micro "
                             f"batches of {micro}")
        self.reader, self.order, self.micro, self.end_tick, self.ahead = reader, order, micro, end_tick, ahead
        per_rank = order.global_batch // world
        self.rows = slice(rank * per_rank, (rank + 1) * per_rank)
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tick-batches")
        self._pending: dict[int, Future] = {}

    def sample_ids(self, tick: int) -> np.ndarray:
        return self.order.batch(tick)[self.rows]

    def get(self, tick: int) -> list[MicroBatch]:
        for upcoming in range(tick, min(tick + 1 + self.ahead, self.end_tick)):
            if upcoming not in self._pending:
                self._pending[upcoming] = self._pool.submit(self._load, upcoming)
        for stale in [t for t in self._pending if t < tick]:  # a skipped tick is not waited for
            self._pending.pop(stale).cancel()
        future = self._pending.pop(tick, None) or self._pool.submit(self._load, tick)
        return future.result()

    def _load(self, tick: int) -> list[MicroBatch]:
        return micro_batches(self.reader, self.sample_ids(tick), self.micro)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()


def eval_batches(reader: BlockReader, samples: int, rank: int, world: int, micro: int) -> list[MicroBatch]:
    """This rank's share of the fixed eval subset (the split's first `samples` blocks, rounded down to
    a multiple of `world`), in micro batches; every rank gets as many batches, since a ZeRO-3
    forward is a collective."""
    per_rank = samples // world
    ids = np.arange(rank * per_rank, (rank + 1) * per_rank, dtype=np.int64)
    batches = micro_batches(reader, ids, micro)
    reader.close()
    return batches
