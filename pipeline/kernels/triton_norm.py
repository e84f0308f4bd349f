"""Fused LayerNorm / RMSNorm with in-kernel Philox noise, in Triton (Apex-style forward and backward).

    forward : x̂ = (x − mean)·rstd (RMS: x·rstd), y = (γ + γ₀)·(x̂ + σ·ε) + β      ε = randn(key, row·N + col)
    backward: dx = rstd·(γdy − x̂·mean(γdy·x̂) − mean(γdy))   (RMS drops the last term)
              dγ = Σ_rows dy·(x̂ + σ·ε),  dβ = Σ_rows dy

γ₀ is 1 for Gemma-style (1 + w) weights and 0 otherwise. ε is regenerated in the backward pass
(never stored); only x, mean and rstd are kept. Statistics are fp32 whatever the input dtype.

Row tiles of BLOCK_M rows are processed per program (cheap under the interpreter, good occupancy for
small N on a GPU). A row that does not fit in BLOCK_N columns is processed in chunks (SINGLE_PASS
False). dγ/dβ are reduced in two deterministic stages: each of a fixed number of row programs writes
fp32 partial sums for its column chunk, then `_sum_partials` adds them in program order. No atomics,
so gradients are bit-reproducible for a given shape.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _normalized(x, mean, rstd, mask, IS_RMS: tl.constexpr):
    if IS_RMS:
        xhat = x * rstd[:, None]
    else:
        xhat = (x - mean[:, None]) * rstd[:, None]
    return tl.where(mask, xhat, 0.0)


@triton.jit
def _with_noise(xhat, row_ids, cols, N, sigma, key, HAS_NOISE: tl.constexpr):
    """x̂ + σ·ε; with HAS_NOISE False this is x̂ and no random numbers are drawn."""
    if HAS_NOISE:
        offsets = row_ids[:, None] * N + cols[None, :]
        return xhat + sigma * tl.randn(key, offsets)
    return xhat


@triton.jit
def _narrowed(y, dtype: tl.constexpr):
    """fp32 `y` as the output's `dtype`, rounded to nearest even. Spelled out in integer ops for
    bf16: a GPU store rounds to nearest even, but Triton's interpreter truncates on every fp32 -> bf16
    path (`.to(..., fp_downcast_rounding="rtne")` included), so only this makes the CPU tests show
    the GPU's rounding. fp16 casts round to nearest even on both."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(dtype)


@triton.jit(do_not_specialize=["key"])  # a new tick's key must not compile a new kernel
def _norm_fwd(
    X, Y, W, B, Mean, Rstd, RowIds,
    stride_x, stride_y, M, N, eps, w_offset, sigma, key,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    y_rows = Y + rows.to(tl.int64)[:, None] * stride_y
    row_ids = tl.load(RowIds + rows, mask=row_mask, other=0) if HAS_NOISE else rows

    # Statistics: one load when the row fits, two passes over chunks otherwise.
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < N)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if not IS_RMS:
            mean = tl.sum(x, axis=1) / N
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
    else:
        if not IS_RMS:
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (cols < N)[None, :]
                total += tl.sum(tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32), axis=1)
            mean = total / N
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            centered = tl.where(mask, x - mean[:, None], 0.0)
            squares += tl.sum(centered * centered, axis=1)
        rstd = 1.0 / tl.sqrt(squares / N + eps)
    if not IS_RMS:
        tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)

    # Output.
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        if not SINGLE_PASS:
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = _with_noise(_normalized(x, mean, rstd, mask, IS_RMS), row_ids, cols, N, sigma, key, HAS_NOISE)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + w_offset
        y = xhat * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_rows + cols[None, :], _narrowed(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_row_stats(
    DY, X, W, Mean, Rstd, C1, C2,
    stride_dy, stride_x, M, N, w_offset,
    IS_RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per-row mean(γdy·x̂) and mean(γdy), needed before dx when a row spans several chunks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    if not IS_RMS:
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows.to(tl.int64)[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + w_offset
        wdy = dy * w[None, :]
        c1 += tl.sum(_normalized(x, mean, rstd, mask, IS_RMS) * wdy, axis=1)
        c2 += tl.sum(wdy, axis=1)
    tl.store(C1 + rows, c1 / N, mask=row_mask)
    tl.store(C2 + rows, c2 / N, mask=row_mask)


@triton.jit(do_not_specialize=["key"])
def _norm_bwd(
    DY, X, W, Mean, Rstd, RowIds, C1, C2, DX, PartialW, PartialB,
    stride_dy, stride_x, stride_dx, M, N, w_offset, sigma, key,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """dx for one column chunk of a strided set of row tiles, plus that program's dγ/dβ partials."""
    row_program = tl.program_id(0)
    row_programs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + w_offset
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(row_program, tl.cdiv(M, BLOCK_M), row_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows.to(tl.int64)[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        if not IS_RMS:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = _normalized(x, mean, rstd, mask, IS_RMS)
        wdy = dy * w[None, :]
        if SINGLE_PASS:
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
        else:
            c1 = tl.load(C1 + rows, mask=row_mask, other=0.0)
            c2 = tl.load(C2 + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + cols[None, :], _narrowed(dx, DX.dtype.element_ty), mask=mask)
        row_ids = tl.load(RowIds + rows, mask=row_mask, other=0) if HAS_NOISE else rows
        dw += tl.sum(dy * _with_noise(xhat, row_ids, cols, N, sigma, key, HAS_NOISE), axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
    tl.store(PartialW + row_program * N + cols, dw, mask=col_mask)
    if HAS_BIAS:
        tl.store(PartialB + row_program * N + cols, db, mask=col_mask)


@triton.jit
def _sum_partials(Partial, Out, P, N, BLOCK_N: tl.constexpr):
    """Out[col] = Σ_p Partial[p, col], in program order: the deterministic second stage."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p in range(0, P):
        total += tl.load(Partial + p * N + cols, mask=col_mask, other=0.0)
    tl.store(Out + cols, total, mask=col_mask)
