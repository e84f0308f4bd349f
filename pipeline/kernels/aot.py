"""Ahead-of-time compilation of every norm kernel variant for GPU targets, without a GPU.

Catches what the interpreter cannot (type errors in lowering, register blow-ups, spills) by running
Triton's real compiler down to a cubin for sm_80 and sm_90. Used by the test suite and by
`python -m pipeline.kernels.aot`, which prints the register/spill report.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

from pipeline.kernels.triton_norm import _norm_bwd, _norm_bwd_row_stats, _norm_fwd, _sum_partials
from pipeline.kernels.triton_ops import launch_config

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
# Hidden sizes covering the three tilings: several rows per program, one whole row, a chunked row.
HIDDEN_SIZES = (768, 2048, 16384)
# fp16 lowers exactly like bf16 apart from the final cast; the interpreter tests cover it on CPU.
ACTIVATION_TYPES = ("bf16", "fp32")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclass(frozen=True)
class Variant:
    kernel: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    maxnreg: int | None = None

    @property
    def label(self) -> str:
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        return f"{self.kernel}[{self.signature.get('X', self.signature.get('Partial'))}; {flags}]"


def _signature(fn, types: dict, constexprs: dict) -> dict:
    return {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}


def variants() -> list[Variant]:
    """Every constexpr combination of every kernel, for each activation dtype."""
    out = []
    for act, (is_rms, has_bias), has_noise, hidden in itertools.product(
            ACTIVATION_TYPES, [(False, True), (False, False), (True, False)], [False, True], HIDDEN_SIZES):
        config = launch_config(hidden)
        single = config["SINGLE_PASS"]
        blocks = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"], "SINGLE_PASS": single}
        pointers = {name: f"*{act}" for name in ("X", "Y", "DY", "DX", "W", "B")}
        pointers.update({name: "*fp32" for name in ("Mean", "Rstd", "C1", "C2", "PartialW", "PartialB")})
        scalars = {"RowIds": "*i64", "M": "i32", "N": "i32", "eps": "fp32", "w_offset": "fp32", "sigma": "fp32",
                   "key": "i64", "stride_x": "i64", "stride_y": "i64", "stride_dy": "i64", "stride_dx": "i64"}
        types = {**pointers, **scalars}
        flags = {"IS_RMS": is_rms, "HAS_BIAS": has_bias, "HAS_NOISE": has_noise, **blocks}
        for name, fn in (("fwd", _norm_fwd), ("bwd", _norm_bwd)):
            out.append(Variant(name, fn, _signature(fn, types, flags), flags, config["num_warps"], config["maxnreg"]))
        if not single and not has_noise and has_bias == (not is_rms):
            stats_flags = {"IS_RMS": is_rms, "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
            out.append(Variant("bwd_row_stats", _norm_bwd_row_stats,
                               _signature(_norm_bwd_row_stats, types, stats_flags), stats_flags, config["num_warps"],
                               config["maxnreg"]))
    partial_flags = {"BLOCK_N": 1024}
    partial_types = {"Partial": "*fp32", "Out": "*fp32", "P": "i32", "N": "i32"}
    out.append(Variant("sum_partials", _sum_partials, _signature(_sum_partials, partial_types, partial_flags),
                       partial_flags, 4))
    return out


@dataclass(frozen=True)
class CompileReport:
    label: str
    target: str
    registers: int
    spill_bytes: int  # local memory per thread: register spills (and any stack frame)
    seconds: float

    def line(self) -> str:
        return f"{self.target}  {self.label:<104} regs={self.registers:<4} spill_bytes={self.spill_bytes:<4}"


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) from cuobjdump; n_regs/n_spills are only filled in by a GPU driver."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", handle.name], capture_output=True,
                               text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1)) + int(re.search(r"STACK:(\d+)", usage).group(1))
    return registers, local


def compile_variant(variant: Variant, target: str) -> CompileReport:
    """Compile one variant to a cubin for `target`; raises on any compile error."""
    started = time.perf_counter()
    source = ASTSource(variant.fn, variant.signature, variant.constexprs)
    kernel = triton_compile(source, target=TARGETS[target], options={"num_warps": variant.num_warps,
                                                                          "maxnreg": variant.maxnreg})
    registers, spill_bytes = _resource_usage(kernel.asm["cubin"])
    return CompileReport(variant.label, target, registers, spill_bytes, time.perf_counter() - started)


def _compile_indexed(job: tuple[int, str]) -> CompileReport:
    index, target = job
    return compile_variant(variants()[index], target)


def compile_all(processes: int = 2) -> list[CompileReport]:
    """Every variant for every target, in worker processes (compilation is CPU-bound)."""
    jobs = [(index, target) for target in TARGETS for index in range(len(variants()))]
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(_compile_indexed, jobs))


def main() -> None:
    reports = compile_all()
    for report in reports:
        print(report.line())
    spilled = [r for r in reports if r.spill_bytes]
    print(f"{len(reports)} kernels compiled, max registers {max(r.registers for r in reports)}, "
          f"{len(spilled)} with spills")
    sys.exit(1 if spilled else 0)


if __name__ == "__main__":
    main()
