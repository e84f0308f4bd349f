"""Which samples train at each tick: a pure function of (seed, epoch, tick), whatever the world size.

An epoch is a permutation of the split's block ids; tick t of an epoch takes positions
[t·B, (t+1)·B) of it, B being the global batch. Each epoch has `blocks // B` ticks, and the
remainder rule is: the last `blocks mod B` positions of each epoch's permutation are not trained
in that epoch (a different remainder every epoch when shuffling). Nothing here depends on the
number of workers: a rank takes a fixed slice of its tick's global batch.

The permutation is a keyed Feistel network over the next power of four, cycle-walked into
[0, blocks): a bijection whose value at any position costs a few hash rounds. So a tick's batch is
computed in O(B) time and O(1) memory for any corpus size, and a resume at tick k starts there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a strong 64-bit integer hash (arithmetic modulo 2^64)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permute(positions, size: int, key: int) -> np.ndarray:
    """The keyed permutation of [0, size) at `positions` (each in [0, size))."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) and (positions.min() < 0 or positions.max() >= size):
        raise ValueError(f"positions must lie in [0, {size})")  # outside the domain cycle-walking never ends
    positions = positions.astype(np.uint64)
    if size <= 1:
        return positions.astype(np.int64)
    half = max(1, ((size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = _mix(np.uint64(key % (1 << 64)) ^ _mix(np.arange(1, _ROUNDS + 1, dtype=np.uint64)))
    values = positions.copy()
    walking = np.ones(len(values), dtype=bool)
    while walking.any():  # cycle-walking: re-encrypt until the value falls inside [0, size)
        left, right = values[walking] >> np.uint64(half), values[walking] & mask
        for round_key in keys:
            left, right = right, left ^ (_mix(right ^ round_key) & mask)
        values[walking] = (left << np.uint64(half)) | right
        walking &= values >= np.uint64(size)
    return values.astype(np.int64)


@dataclass(frozen=True)
class SampleOrder:
    """The global batch of every tick over `blocks` sample ids."""

    blocks: int
    global_batch: int
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        if self.global_batch < 1 or self.blocks < self.global_batch:
            raise ValueError(f"{self.blocks} blocks cannot fill one global batch of {self.global_batch}")

    @property
    def ticks_per_epoch(self) -> int:
        return self.blocks // self.global_batch

    def epoch(self, tick: int) -> int:
        return tick // self.ticks_per_epoch

    def batch(self, tick: int) -> np.ndarray:
        """The sample ids of tick `tick`'s global batch, in the order ranks slice them."""
        epoch, step = divmod(tick, self.ticks_per_epoch)
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
        if not self.shuffle:
            return positions
        # Mixed before the epoch is added: (seed, epoch) pairs must not collide (as seed ^ epoch would).
        with np.errstate(over="ignore"):
            key = int(_mix(_mix(np.array([self.seed % (1 << 64)], dtype=np.uint64)) + np.uint64(epoch))[0])
        return permute(positions, self.blocks, key)
