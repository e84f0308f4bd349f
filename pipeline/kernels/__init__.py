"""Fused LayerNorm / RMSNorm with tick-synchronized noise: Triton on GPUs, a torch twin elsewhere.

    layer_norm(x, weight, bias, eps, noise=Noise(...))  ->  γ·(x̂ + σ·ε) + β
    rms_norm(x, weight, eps, noise=Noise(...))          ->  γ·(x̂ + σ·ε)

Both backends compute the same function from the same Philox stream (`pipeline.noise`), regenerate
ε in the backward pass instead of storing it, and are differentiable in x, weight and bias.
`signed_uniform` draws the embedding (NEFTune) noise's uniforms, with the native C kernel on CPU.
Knows nothing about Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

import os

import torch

from pipeline.kernels.spec import NormSpec
from pipeline.noise import Noise
from pipeline.noise import signed_uniform as reference_signed_uniform

BACKENDS = ("auto", "triton", "torch")

__all__ = ["BACKENDS", "layer_norm", "resolve_backend", "rms_norm", "signed_uniform"]


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' is Triton for CUDA tensors and torch otherwise; 'triton' on CPU needs the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                         "imported; use backend 'torch' or 'auto' on CPU")
    return backend


def _spec(eps: float, is_rms: bool, weight_offset: float, noise: Noise | None, x: torch.Tensor) -> NormSpec:
    if noise is None or noise.sigma == 0.0:
        return NormSpec(eps=eps, is_rms=is_rms, weight_offset=weight_offset)
    if tuple(noise.row_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"noise.row_ids has shape {tuple(noise.row_ids.shape)}; it must be x.shape[:-1] = "
                         f"{tuple(x.shape[:-1])}")
    return NormSpec(eps=eps, is_rms=is_rms, weight_offset=weight_offset, sigma=float(noise.sigma), key=noise.key,
                    row_ids=noise.row_ids)


def _apply(x, weight, bias, spec: NormSpec, backend: str, max_block_n: int | None):
    if resolve_backend(backend, x) == "triton":
        from pipeline.kernels.triton_ops import MAX_BLOCK_N, TritonNorm  # imports triton only when used

        return TritonNorm.apply(x, weight, bias, spec, max_block_n or MAX_BLOCK_N)
    from pipeline.kernels.torch_ops import TorchNorm

    return TorchNorm.apply(x, weight, bias, spec)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5, *,
               noise: Noise | None = None, backend: str = "auto", max_block_n: int | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension with optional noise σ·ε on the normalized activations.

    `max_block_n` caps the Triton column block (tests use it to exercise the chunked path).
    """
    return _apply(x, weight, bias, _spec(eps, False, 0.0, noise, x), backend, max_block_n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, noise: Noise | None = None,
             backend: str = "auto", weight_offset: float = 0.0, max_block_n: int | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension; `weight_offset=1.0` gives Gemma's (1 + w) scaling."""
    return _apply(x, weight, None, _spec(eps, True, weight_offset, noise, x), backend, max_block_n)


def signed_uniform(key: int, row_ids: torch.Tensor, n: int) -> torch.Tensor:
    """2·tl.rand(key, row_id·n + channel) − 1, float32 in [−1, 1) of shape row_ids.shape + (n,), bit for
    bit `pipeline.noise.neftune.signed_uniform`: the native kernel on CPU, torch Philox elsewhere (on a
    GPU its int64 element-wise ops are cheap next to a forward pass)."""
    from pipeline.kernels import native

    if row_ids.device.type == "cpu" and native.library() is not None:
        return native.uniform_rows(key, row_ids, n) * 2.0 - 1.0
    return reference_signed_uniform(key, row_ids, n)
