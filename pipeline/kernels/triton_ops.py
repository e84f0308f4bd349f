"""Launching the Triton norm kernels: block sizes, buffers and the autograd.Function."""

from __future__ import annotations

import torch
import triton

from pipeline.kernels.spec import NormSpec, rows_2d
from pipeline.kernels.triton_norm import _norm_bwd, _norm_bwd_row_stats, _norm_fwd, _sum_partials

MAX_TILE = 2048  # elements per program tile: with 8 warps, no variant spills registers (AOT report)
MAX_BLOCK_N = 2048  # a longer row is processed in chunks
MAX_ROW_PROGRAMS = 128  # backward row programs: fixed per shape, so dγ/dβ sum in a fixed order


def launch_config(n: int, max_block_n: int = MAX_BLOCK_N) -> dict:
    """Block sizes for hidden size n. `max_block_n` below n forces the chunked path (tests use it)."""
    block_n = min(triton.next_power_of_2(n), triton.next_power_of_2(max_block_n))
    block_m = max(1, min(16, MAX_TILE // block_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SINGLE_PASS": n <= block_n,
            # 256 tile elements per warp keeps the noisy backward (Box-Muller temporaries) unspilled.
            "num_warps": max(4, block_m * block_n // 256),
            # Left alone, ptxas sometimes caps the noisy backward at 80 registers and spills a few bytes.
            "maxnreg": 128}


class TritonNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: NormSpec, max_block_n: int):
        x2 = rows_2d(x)
        m, n = x2.shape
        config = launch_config(n, max_block_n)
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        row_ids = spec.flat_row_ids(m, x.device)
        _norm_fwd[(triton.cdiv(m, config["BLOCK_M"]),)](
            x2, y, weight, bias if bias is not None else weight, mean, rstd, row_ids,
            x2.stride(0), y.stride(0), m, n, spec.eps, spec.weight_offset, spec.sigma, spec.key,
            IS_RMS=spec.is_rms, HAS_BIAS=bias is not None, HAS_NOISE=spec.has_noise, **config,
        )
        ctx.save_for_backward(x2, weight, bias, mean, rstd, row_ids)
        ctx.spec, ctx.config, ctx.x_shape = spec, config, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd, row_ids = ctx.saved_tensors
        spec, config = ctx.spec, ctx.config
        m, n = x2.shape
        dy2 = rows_2d(dy)
        dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
        block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
        row_programs = min(triton.cdiv(m, block_m), MAX_ROW_PROGRAMS)
        col_chunks = triton.cdiv(n, block_n)
        partial_w = torch.empty((row_programs, n), dtype=torch.float32, device=x2.device)
        partial_b = torch.empty_like(partial_w) if bias is not None else partial_w
        c1 = c2 = mean  # unused placeholders on the single-pass path
        if not config["SINGLE_PASS"]:
            c1 = torch.empty(m, dtype=torch.float32, device=x2.device)
            c2 = torch.empty_like(c1)
            _norm_bwd_row_stats[(triton.cdiv(m, block_m),)](
                dy2, x2, weight, mean, rstd, c1, c2, dy2.stride(0), x2.stride(0), m, n, spec.weight_offset,
                IS_RMS=spec.is_rms, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=config["num_warps"],
                maxnreg=config["maxnreg"],
            )
        _norm_bwd[(row_programs, col_chunks)](
            dy2, x2, weight, mean, rstd, row_ids, c1, c2, dx, partial_w, partial_b,
            dy2.stride(0), x2.stride(0), dx.stride(0), m, n, spec.weight_offset, spec.sigma, spec.key,
            IS_RMS=spec.is_rms, HAS_BIAS=bias is not None, HAS_NOISE=spec.has_noise, **config,
        )
        dw = _reduce_partials(partial_w, weight.dtype)
        db = _reduce_partials(partial_b, bias.dtype) if bias is not None else None
        return dx.view(ctx.x_shape), dw, db, None, None


def _reduce_partials(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    programs, n = partial.shape
    out = torch.empty(n, dtype=torch.float32, device=partial.device)
    block_n = min(triton.next_power_of_2(n), 1024)
    _sum_partials[(triton.cdiv(n, block_n),)](partial, out, programs, n, BLOCK_N=block_n)
    return out.to(dtype)
