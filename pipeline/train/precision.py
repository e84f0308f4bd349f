"""The dtype a run trains in: what its DeepSpeed config resolves to, and a check that the engine's
weights really are in it.

The check exists because libraries pick dtypes from host features. DeepSpeed 0.19.8's `zero.Init`
dropped an explicit `dtype=torch.float32` on CPUs without oneDNN fp16 and built the model in bf16
(bench/README.md, "Upstream bugs worked around"); a run must stop on such a change, not train on through it.
"""

from __future__ import annotations

import torch


class PrecisionMismatch(RuntimeError):
    """The engine's weights are in another dtype than the run's config asks for."""


def training_dtype(ds_config: dict) -> torch.dtype:
    """The dtype the model trains in, read from the DeepSpeed config it trains under (so a switch
    made through train.deepspeed counts too), as `zero.Init` reads it when given no dtype: what the
    loaders build, the engine checks and the export writes."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def check_trains_in(module: torch.nn.Module, expected: torch.dtype, when: str) -> None:
    """Stop, in one line, if any floating-point weight of `module` is not `expected` (a ZeRO-3
    weight is judged by its partition, the only values the rank holds)."""
    wrong: dict[torch.dtype, list[str]] = {}
    for name, param in module.named_parameters():
        dtype = getattr(param, "ds_tensor", param).dtype
        if dtype.is_floating_point and dtype != expected:
            wrong.setdefault(dtype, []).append(name)
    if wrong:
        found = "; ".join(f"{len(names)} in {_name(dtype)} ({names[0]}{', ...' if len(names) > 1 else ''})"
                          for dtype, names in wrong.items())
        raise PrecisionMismatch(f"train.precision: the config resolves to {_name(expected)}, but {when} the model has "
                                f"weights in another dtype: {found}; a library changed the precision, so the run stops "
                                "rather than train in a precision nobody asked for")


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
