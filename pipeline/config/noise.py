"""The `noise:` and `kernel:` sections: training noise, and the fused norm that carries it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.section import Section


class NoiseConfig(Section):
    """Training noise at one or two sites: σ_t·ε inside every fused norm, σ_t = sigma·(1+tick)^(−decay),
    and NEFTune's uniform noise on the input embedding. Both are drawn from Philox keyed by (seed, tick,
    layer) and positions, so they are the same on any number of workers and after a resume."""

    site: Literal["norm", "embedding", "both"] = "norm"
    """Where noise goes: `norm`: the fused norms only (`sigma`); `embedding`: the input embedding only
    (`neftune_alpha`), and then `sigma` must be 0; `both`: each site with its own setting."""
    sigma: float = Field(0.0, ge=0)
    """The norms' σ (site `norm` or `both`); 0: off."""
    decay: float = Field(0.0, ge=0)
    """σ_t = sigma·(1+tick)^(−decay); of σ only: `neftune_alpha` stays constant."""
    seed: int = Field(0, ge=0)
    """Keys the noise streams, with the tick and the layer."""
    neftune_alpha: float = Field(5.0, ge=0, allow_inf_nan=False)
    """NEFTune's α (site `embedding` or `both`; ignored for `norm`): uniform noise in [−α, α)/√(L·d) on
    the input embedding's output while training, d the hidden size and L the token's own example length
    (each packed example its own; padding gets none and counts in no L; raw text, packed naively: the
    block length). Constant over ticks; 5 is the paper's usual value; 0: off."""

    @model_validator(mode="after")
    def _check_site(self) -> NoiseConfig:
        if self.site == "embedding" and self.sigma > 0:
            raise ValueError(f"sigma: {self.sigma:g} would be ignored: site 'embedding' puts noise on the input "
                             f"embedding only (neftune_alpha); set site 'both' to keep the norms' noise, or sigma 0")
        return self

    @property
    def embedding_alpha(self) -> float:
        """NEFTune's α where site puts noise on the embedding, else 0 (sigma is 0 where it puts none on norms)."""
        return self.neftune_alpha if self.site in ("embedding", "both") else 0.0


class KernelConfig(Section):
    """Which implementation of the fused norm runs: Triton on GPUs, the torch path on CPUs."""

    backend: Literal["auto", "triton", "torch"] = "auto"
    """`auto`: Triton on CUDA, torch elsewhere."""
