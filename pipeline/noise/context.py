"""The noise context: set by the trainer for each micro-step, read by every fused norm and by the
input embedding's NEFTune hook.

Hugging Face forward signatures stay unchanged because the norms read (tick, seed, sample ids)
from here instead of from their arguments. The context is one slot per process, shared by its
threads, on purpose: on a GPU the backward pass, and so activation checkpointing's recomputation of
the forward, runs on the autograd engine's device threads, which see neither a thread-local nor (in
the torch versions pinned here, unless torch propagates it) a `contextvars.ContextVar` set by the
thread that called backward; the recomputed norms must still find the micro-step's noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_current: list = [None]  # one slot, process-wide


@dataclass(frozen=True)
class NoiseContext:
    """Noise settings for one micro-step. `sigma` is already the scheduled σ_t for `tick`; the norms
    use it, the input embedding uses `neftune_alpha` and `example_lengths`. Either may be off alone."""

    sigma: float
    seed: int
    tick: int
    sample_ids: torch.Tensor  # int64 (batch,): the global block id of each sequence
    enabled: bool = True
    neftune_alpha: float = 0.0  # 0: no embedding noise
    # int64 (batch, seq_len): the length L of the example each token belongs to, 0 for a token that
    # gets no embedding noise (padding). Required when neftune_alpha > 0.
    example_lengths: torch.Tensor | None = None

    def row_ids(self, leading_shape: torch.Size) -> torch.Tensor:
        """row ids for activations whose leading shape is (batch, seq_len, *rest).

        row_id = sample_id·seq_len + position. Extra dimensions (per-head norms, for example)
        are folded into the row: ((sample_id·seq_len + position)·rest + index).
        """
        if len(leading_shape) < 2 or leading_shape[0] != self.sample_ids.shape[0]:
            raise ValueError(
                f"noise: activations of leading shape {tuple(leading_shape)} do not start with the "
                f"batch of {self.sample_ids.shape[0]} sample ids set for this micro-step"
            )
        batch, seq_len, *rest = leading_shape
        per_row = 1
        for size in rest:
            per_row *= size
        ids = self.sample_ids.to(torch.int64).view(batch, 1) * seq_len
        ids = ids + torch.arange(seq_len, dtype=torch.int64, device=ids.device)
        if per_row > 1:
            ids = ids.unsqueeze(-1) * per_row + torch.arange(per_row, dtype=torch.int64, device=ids.device)
        return ids.reshape(leading_shape)


def active_noise_context() -> NoiseContext | None:
    """The context in force, or None when noise is off (no context, disabled or σ = 0)."""
    context = _current[0]
    if context is None or not context.enabled or context.sigma == 0.0:
        return None
    return context


def active_neftune_context() -> NoiseContext | None:
    """The context in force when it asks for embedding noise (enabled, α > 0), else None."""
    context = _current[0]
    if context is None or not context.enabled or context.neftune_alpha == 0.0:
        return None
    return context


@contextlib.contextmanager
def noise_context(context: NoiseContext | None) -> Iterator[None]:
    """Make `context` the one in force inside the block (None turns noise off, e.g. for eval)."""
    previous = _current[0]
    _current[0] = context
    try:
        yield
    finally:
        _current[0] = previous
