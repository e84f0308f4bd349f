"""Tick-synchronized noise: the definition of ε, the σ schedule and the per-micro-step context.

ε for one element is `tl.randn(stream_key(seed, tick, layer), row_id * n + channel)`, with
row_id = sample_id * seq_len + position. It depends on nothing else, so it is the same on every
rank, for any world size or sharding, and after a resume. The input embedding's NEFTune noise
(`neftune`) is keyed the same way, on a layer index of its own. Torch only: no Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.noise.context import NoiseContext, active_neftune_context, active_noise_context, noise_context
from pipeline.noise.neftune import EMBEDDING_LAYER, embedding_key, neftune_scale, signed_uniform
from pipeline.noise.philox import philox_normal, stream_key

__all__ = ["EMBEDDING_LAYER", "Noise", "NoiseContext", "active_neftune_context", "active_noise_context",
           "embedding_key", "neftune_scale", "noise_context", "normal", "offsets", "sigma_at", "signed_uniform",
           "stream_key"]


@dataclass(frozen=True)
class Noise:
    """What one norm call needs to add σ·ε: the effective σ_t, the stream and each row's id."""

    sigma: float
    seed: int
    tick: int
    layer: int
    row_ids: torch.Tensor  # int64, shape x.shape[:-1]

    @property
    def key(self) -> int:
        return stream_key(self.seed, self.tick, self.layer)


def sigma_at(sigma: float, decay: float, tick: int) -> float:
    """σ_t = σ·(1+t)^(−decay)."""
    return sigma * (1.0 + tick) ** (-decay)


def offsets(row_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Philox counters row_id·n + channel, shape row_ids.shape + (n,)."""
    channels = torch.arange(n, dtype=torch.int64, device=row_ids.device)
    return row_ids.to(torch.int64).unsqueeze(-1) * n + channels


def normal(seed: int, tick: int, layer: int, row_ids: torch.Tensor, n: int) -> torch.Tensor:
    """ε of shape row_ids.shape + (n,), float32, from the torch Philox: the reference stream."""
    return philox_normal(stream_key(seed, tick, layer), offsets(row_ids, n))
