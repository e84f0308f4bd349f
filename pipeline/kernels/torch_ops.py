"""The torch path: the same function and noise stream as the Triton kernels, for any device.

On CPU, fp32/bf16/fp16 work goes to the native kernel (`native.py`: OpenMP + SIMD C) when it is
available, because eager torch Philox is ~50x slower than the norm itself. float64 (gradcheck), other
devices, and machines without a C compiler use the plain torch ops below, which are the definition.
"""

from __future__ import annotations

import torch

from pipeline.kernels import native
from pipeline.kernels.spec import NormSpec, rows_2d
from pipeline.noise import offsets
from pipeline.noise.philox import philox_normal


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _statistics(x: torch.Tensor, spec: NormSpec) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) if spec.is_rms else x.mean(dim=1)
    centered = x if spec.is_rms else x - mean[:, None]
    rstd = torch.rsqrt((centered * centered).mean(dim=1) + spec.eps)
    return mean, rstd


def _noisy(xhat: torch.Tensor, spec: NormSpec, row_ids: torch.Tensor) -> torch.Tensor:
    """x̂ + σ·ε, with ε drawn from the reference Philox stream (never stored)."""
    if not spec.has_noise:
        return xhat
    eps = philox_normal(spec.key, offsets(row_ids, xhat.shape[1])).to(xhat.dtype)
    return xhat + spec.sigma * eps


class TorchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: NormSpec):
        x2 = rows_2d(x)
        row_ids = spec.flat_row_ids(x2.shape[0], x.device)
        if native.handles(x2, weight, bias):
            y, mean, rstd = native.forward(x2, weight, bias, spec, row_ids)
        else:
            dtype = _compute_dtype(x)
            xf = x2.to(dtype)
            mean, rstd = _statistics(xf, spec)
            xhat = (xf - mean[:, None]) * rstd[:, None]
            y = _noisy(xhat, spec, row_ids) * (weight.to(dtype) + spec.weight_offset)
            if bias is not None:
                y = y + bias.to(dtype)
            y = y.to(x.dtype)
        ctx.save_for_backward(x2, weight, bias, mean, rstd, row_ids)
        ctx.spec, ctx.x_shape = spec, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd, row_ids = ctx.saved_tensors
        spec = ctx.spec
        dy2 = rows_2d(dy)
        if native.handles(x2, weight, bias):
            dx, dw, db = native.backward(dy2, x2, weight, bias, mean, rstd, spec, row_ids)
        else:
            dtype = _compute_dtype(x2)
            xf, dyf = x2.to(dtype), dy2.to(dtype)
            xhat = (xf - mean[:, None]) * rstd[:, None]
            wdy = dyf * (weight.to(dtype) + spec.weight_offset)
            c1 = (xhat * wdy).mean(dim=1, keepdim=True)
            centered = wdy - xhat * c1
            if not spec.is_rms:
                centered = centered - wdy.mean(dim=1, keepdim=True)
            dx = (centered * rstd[:, None]).to(x2.dtype)
            dw = (dyf * _noisy(xhat, spec, row_ids)).sum(dim=0).to(weight.dtype)
            db = dyf.sum(dim=0).to(bias.dtype) if bias is not None else None
        return dx.view(ctx.x_shape), dw, db, None
