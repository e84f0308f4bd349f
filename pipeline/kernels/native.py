"""The CPU fast path: `native_norm.c`, compiled on first use and called through ctypes.

Why: the torch path must regenerate Philox noise in both passes, and eager torch Philox costs ~50x
the norm itself; inductor-compiled Philox is still ~3x too slow on this kind of CPU. A 150-line C
file with OpenMP and vector math meets the target and needs only the C compiler that DeepSpeed's
CPU ops already require. When no compiler works, or `PIPELINE_NATIVE_NORM=0`, the torch path runs
its plain torch ops instead, with a one-time warning.

The library is built into `~/.cache/pipeline/native/<hash>/` (hash of source, flags, compiler and
CPU flags, since -march=native ties it to the CPU) through a temporary file and an atomic rename.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from pipeline.kernels.spec import NormSpec

SOURCE = Path(__file__).with_name("native_norm.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
ROWS_PER_BLOCK = 32  # must match native_norm.c
_i64, _f32, _u64, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pipeline" / "native"


def _compiler() -> str:
    return os.environ.get("CC", "gcc")


def _build() -> Path:
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode())
    target = _cache_root() / digest.hexdigest()[:16] / "libpipeline_norm.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"], capture_output=True, text=True,
                       check=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded native library, or None (with one warning saying why) when it cannot be built."""
    if os.environ.get("PIPELINE_NATIVE_NORM", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"native CPU norm kernel unavailable, using plain torch ops (slower): {detail.strip()[:300]}")
        return None
    lib.philox_normal_rows.argtypes = [_u64, _ptr, _i64, _i64, _ptr, _int]
    lib.philox_uniform_rows.argtypes = [_u64, _ptr, _i64, _i64, _ptr, _int]
    lib.norm_forward.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32, _f32, _int, _f32, _u64,
                                 _ptr, _int]
    lib.norm_backward.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64,
                                  _f32, _int, _f32, _u64, _ptr, _int]
    return lib


def _address(tensor: torch.Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None else None


def handles(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when the native kernel can run this call: fp32 CPU tensors with contiguous parameters."""
    tensors = [x2, weight] + ([bias] if bias is not None else [])
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and weight.is_contiguous() and (bias is None or bias.is_contiguous()) and library() is not None)


def normal_rows(key: int, row_ids: torch.Tensor, n: int) -> torch.Tensor:
    """ε for contiguous int64 CPU `row_ids`: what `pipeline.noise.normal` computes, ~50x faster."""
    ids = row_ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty((ids.numel(), n), dtype=torch.float32)
    library().philox_normal_rows(key, ids.data_ptr(), ids.numel(), n, out.data_ptr(), torch.get_num_threads())
    return out.view(*row_ids.shape, n)


def uniform_rows(key: int, row_ids: torch.Tensor, n: int) -> torch.Tensor:
    """tl.rand(key, row_id·n + channel) in [0, 1) for CPU `row_ids`, bit for bit; eager torch Philox
    takes ~400x longer (8 x 512 x 576 on 2 cores: 12 s against 0.03 s)."""
    ids = row_ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty((ids.numel(), n), dtype=torch.float32)
    library().philox_uniform_rows(key, ids.data_ptr(), ids.numel(), n, out.data_ptr(), torch.get_num_threads())
    return out.view(*row_ids.shape, n)


def forward(x2, weight, bias, spec: NormSpec, row_ids):
    rows, n = x2.shape
    y = torch.empty((rows, n), dtype=torch.float32)
    mean = torch.empty(rows, dtype=torch.float32)
    rstd = torch.empty(rows, dtype=torch.float32)
    library().norm_forward(x2.data_ptr(), x2.stride(0), weight.data_ptr(), _address(bias), y.data_ptr(),
                           mean.data_ptr(), rstd.data_ptr(), rows, n, spec.eps, spec.weight_offset, int(spec.is_rms),
                           spec.sigma if spec.has_noise else 0.0, spec.key, row_ids.data_ptr(),
                           torch.get_num_threads())
    return y, mean, rstd


def backward(dy2, x2, weight, bias, mean, rstd, spec: NormSpec, row_ids):
    rows, n = x2.shape
    dy2 = dy2.to(torch.float32)
    blocks = -(-rows // ROWS_PER_BLOCK)
    dx = torch.empty((rows, n), dtype=torch.float32)
    partial_w = torch.empty((blocks, n), dtype=torch.float32)
    partial_b = torch.empty((blocks, n), dtype=torch.float32) if bias is not None else None
    dw = torch.empty(n, dtype=torch.float32)
    db = torch.empty(n, dtype=torch.float32) if bias is not None else None
    library().norm_backward(dy2.data_ptr(), dy2.stride(0), x2.data_ptr(), x2.stride(0), weight.data_ptr(),
                            mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), partial_w.data_ptr(),
                            _address(partial_b), dw.data_ptr(), _address(db), rows, n, spec.weight_offset,
                            int(spec.is_rms), spec.sigma if spec.has_noise else 0.0, spec.key, row_ids.data_ptr(),
                            torch.get_num_threads())
    return dx, dw, db
