"""NEFTune (Jain et al., 2023) as a noise site: uniform noise on the input embedding's output.

    e'[token, channel] = e[token, channel] + α/√(L·d) · u,   u = 2·tl.rand(key, row_id·d + channel) − 1

with key = stream_key(seed, tick, EMBEDDING_LAYER) and row_id = sample_id·seq_len + position, the
keying of the norms' ε, so u too is the same on every rank, for any world size, and after a resume.
d is the hidden size and L the length of the token's own example (`NoiseContext.example_lengths`):
in a block packed by document each example uses its own L, padding gets no noise and counts in no L.
A uniform in [−1, 1) times α/√(L·d) is the paper's noise; only its L is per example here, where the
paper (unpacked, unpadded batches) has the sequence length.
"""

from __future__ import annotations

import torch

from pipeline.noise.context import NoiseContext
from pipeline.noise.philox import philox_uniform, stream_key

# The embedding's stream: a layer index no norm reaches (norms are numbered 0, 1, ... in module order).
EMBEDDING_LAYER = 1 << 20


def embedding_key(context: NoiseContext) -> int:
    return stream_key(context.seed, context.tick, EMBEDDING_LAYER)


def signed_uniform(key: int, row_ids: torch.Tensor, n: int) -> torch.Tensor:
    """2·tl.rand(key, row_id·n + channel) − 1 in [−1, 1), float32 of shape row_ids.shape + (n,): the
    torch reference (exact: integer Philox, then one float32 multiply and subtract)."""
    channels = torch.arange(n, dtype=torch.int64, device=row_ids.device)
    offsets = row_ids.to(torch.int64).unsqueeze(-1) * n + channels
    return philox_uniform(key, offsets) * 2.0 - 1.0


def neftune_scale(alpha: float, example_lengths: torch.Tensor, d: int) -> torch.Tensor:
    """α/√(L·d) per token, float32 of example_lengths' shape; 0 where L is 0 (padding). Computed in
    float64 and rounded once, so any implementation of the formula gets the same float32."""
    lengths = example_lengths.to(torch.float64)
    scale = alpha / torch.sqrt(lengths.clamp_min(1.0) * d)
    return torch.where(example_lengths > 0, scale, 0.0).to(torch.float32)
