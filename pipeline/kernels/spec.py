"""What both backends share: the description of one norm call and the 2-D view of its rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NormSpec:
    """One norm call: the function (LayerNorm or RMSNorm, γ offset) and its noise, if any."""

    eps: float
    is_rms: bool
    weight_offset: float = 0.0  # 1.0 for Gemma-style (1 + w) weights
    sigma: float = 0.0
    key: int = 1 << 62  # Philox key; a fixed in-range value when there is no noise
    row_ids: torch.Tensor | None = None  # int64, x.shape[:-1]

    @property
    def has_noise(self) -> bool:
        return self.sigma != 0.0 and self.row_ids is not None

    def flat_row_ids(self, rows: int, device: torch.device) -> torch.Tensor:
        """row ids as a contiguous int64 vector (a one-element placeholder without noise)."""
        if not self.has_noise:
            return torch.zeros(1, dtype=torch.int64, device=device)
        ids = self.row_ids.reshape(-1).to(device=device, dtype=torch.int64).contiguous()
        if ids.numel() != rows:
            raise ValueError(f"noise.row_ids has {ids.numel()} entries for {rows} rows of activations")
        return ids


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, hidden) with unit column stride; copies only when the layout requires it."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
