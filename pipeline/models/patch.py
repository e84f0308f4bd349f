"""Swap a Hugging Face model's norms for fused, noise-aware ones (`pipeline.kernels`).

Every norm inside every Transformer block, plus the final norm next to the block list, becomes a
`FusedNorm` that holds the original parameter objects, so optimizers, DeepSpeed and checkpoints
see exactly the same parameters and state_dict keys. Norms are recognised by type and behaviour,
never by per-model name lists:

- the blocks are the outermost `nn.ModuleList`s whose children share one class and each hold a norm;
- a norm is a leaf `nn.LayerNorm`/`nn.RMSNorm` subclass, or a leaf whose class name contains "norm",
  whose own parameters are all 1-D;
- each norm is run on probe inputs with random weights and matched against LayerNorm, RMSNorm and
  Gemma's RMSNorm with (1 + w) weights. A norm that matches none stops the patch before anything
  is replaced: a model is never patched halfway.

Norms outside the blocks other than the final norm (BERT's embedding LayerNorm, an MLM head's) are
left alone and listed in the report. Patching an already patched model is a no-op that returns 0.
Patch before `deepspeed.initialize` (its ZeRO-3 hooks attach to the modules there). Parameters that
`deepspeed.zero.Init` has already partitioned are fine: the probe uses random weights of each
parameter's full shape (`ds_shape`), never the values.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline import kernels
from pipeline.noise import Noise, active_noise_context

__all__ = ["FusedNorm", "NormPatchReport", "patch_norms", "patch_norms_with_report"]

_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")
_FORMS = (("layer_norm", 0.0), ("rms_norm", 0.0), ("rms_norm", 1.0))  # (kind, weight_offset)
_PROBE_HIDDEN = 16  # for weightless norms, which work at any width
_TOLERANCE = 1e-5


class FusedNorm(nn.Module):
    """A LayerNorm or RMSNorm on the fused kernels, adding σ·ε while training under a noise context."""

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, eps: float, kind: str,
                 weight_offset: float, layer: int, backend: str, hidden: int | None):
        super().__init__()
        # The original Parameter objects, registered under their original names: same keys, same
        # optimizer state, and ZeRO-3 gathers them before this module's forward.
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias)
        self.eps, self.kind, self.weight_offset = eps, kind, weight_offset
        self.layer, self.backend = layer, backend
        self.hidden = hidden  # kept because ZeRO-3 empties the weight's own shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = self._noise(x)
        # A weightless norm gets ones made here rather than a buffer: no state_dict entry, and
        # always the dtype and device of x.
        weight = self.weight if self.weight is not None else x.new_ones(x.shape[-1])
        if self.kind == "layer_norm":
            return kernels.layer_norm(x, weight, self.bias, self.eps, noise=noise, backend=self.backend)
        return kernels.rms_norm(x, weight, self.eps, noise=noise, backend=self.backend,
                                weight_offset=self.weight_offset)

    def _noise(self, x: torch.Tensor) -> Noise | None:
        """Noise only in training mode under an active context: evaluation is always noise-free."""
        context = active_noise_context() if self.training else None
        if context is None:
            return None
        return Noise(context.sigma, context.seed, context.tick, self.layer, context.row_ids(x.shape[:-1]))

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset:g}" if self.weight_offset else ""
        hidden = self.hidden if self.hidden is not None else "any"
        return f"{self.kind}, {hidden}, eps={self.eps:g}{offset}, layer={self.layer}, backend={self.backend}"


@dataclass
class NormPatchReport:
    """What `patch_norms_with_report` replaced, and which norms it deliberately left alone."""

    replaced: int = 0
    in_blocks: int = 0  # norms replaced inside Transformer blocks
    blocks: int = 0  # Transformer blocks they sit in
    final: int = 0  # norms replaced next to the block list (the final norm)
    classes: dict[str, int] = field(default_factory=dict)  # original class name -> count
    left_outside: list[str] = field(default_factory=list)  # norms outside the blocks, not patched

    def summary(self) -> str:
        classes = ", ".join(f"{count} {name}" for name, count in self.classes.items()) or "none"
        line = (f"{self.replaced} norms replaced ({self.in_blocks} in {self.blocks} blocks, {self.final} final; "
                f"{classes})")
        if self.left_outside:
            line += f"; left unpatched outside the blocks: {', '.join(self.left_outside)}"
        return line


@dataclass(frozen=True)
class _Form:
    kind: str
    weight_offset: float
    eps: float
    hidden: int | None


def patch_norms(model: nn.Module, backend: str = "auto") -> int:
    """Replace the model's block and final norms in place; the number replaced (0 if already patched)."""
    return patch_norms_with_report(model, backend).replaced


def patch_norms_with_report(model: nn.Module, backend: str = "auto") -> NormPatchReport:
    """Replace the model's block and final norms in place and report what was and wasn't replaced.

    Raises ValueError, before replacing anything, when no block list is found or a norm to replace
    behaves like none of LayerNorm, RMSNorm and Gemma's RMSNorm.
    """
    if backend not in kernels.BACKENDS:
        raise ValueError(f"kernel backend must be one of {kernels.BACKENDS}, got {backend!r}")
    if any(isinstance(module, FusedNorm) for module in model.modules()):
        return NormPatchReport()  # already patched: a no-op, so a second call cannot double-wrap
    if any(hasattr(m, "ds_id") for m in model.modules()):  # the ZeRO-3 engine numbers the modules it hooks
        raise ValueError("patch the norms before deepspeed.initialize: its ZeRO-3 hooks would miss the new modules")

    block_lists = _block_lists(model)
    if not block_lists:
        raise ValueError(f"{type(model).__name__}: found no Transformer block list (an nn.ModuleList whose "
                         f"children share one class and each contain a norm); cannot place the fused norms")
    norms = _locate_norms(model, block_lists)
    targets = [(name, module, place) for name, module, place in norms if place != "outside"]

    forms: dict[int, _Form] = {}  # by id(module): a norm shared between places is probed once
    for name, module, _ in targets:
        if id(module) not in forms:
            forms[id(module)] = _classify(name, module)

    # Everything is known to be patchable: only now touch the model. Layers count in module order.
    fused: dict[int, FusedNorm] = {}
    places: dict[int, str] = {}
    for name, module, place in targets:
        if id(module) not in fused:
            fused[id(module)] = _fuse(module, forms[id(module)], len(fused), backend)
            places[id(module)] = place
        _replace(model, name, fused[id(module)])

    originals = {id(module): module for _, module, _ in targets}
    return NormPatchReport(
        replaced=len(fused),
        in_blocks=sum(place == "block" for place in places.values()),
        blocks=sum(len(blocks) for _, blocks in block_lists),
        final=sum(place == "final" for place in places.values()),
        classes=dict(Counter(type(module).__name__ for module in originals.values())),
        left_outside=[name for name, _, place in norms if place == "outside"],
    )


def _is_norm(module: nn.Module) -> bool:
    """A norm by type or name: a leaf module whose own parameters (if any) are all 1-D."""
    if isinstance(module, FusedNorm) or next(module.children(), None) is not None:
        return False
    named = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()
    return named and all(len(full_shape(p)) == 1 for p in module.parameters(recurse=False))


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 has partitioned it (its own shape is then empty)."""
    return getattr(param, "ds_shape", param.shape)


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ModuleLists of same-class children that each contain a norm: the Transformer blocks.

    Requiring norms keeps MoE expert lists and other homogeneous lists out; taking every outermost
    list (not just the largest) covers encoder-decoder stacks too.
    """
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():  # parents come before their children
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if len({type(child) for child in module}) == 1 and all(
                any(_is_norm(m) for m in child.modules()) for child in module):
            found.append((name, module))
    return found


def _locate_norms(model: nn.Module, block_lists: list[tuple[str, nn.ModuleList]]
                  ) -> list[tuple[str, nn.Module, str]]:
    """Every norm, in module order, with its place: "block", "final" (a sibling of a block list) or "outside"."""
    prefixes = tuple(f"{name}." for name, _ in block_lists)
    parents = {name.rpartition(".")[0] for name, _ in block_lists}
    found = []
    for name, module in model.named_modules(remove_duplicate=False):  # every place a shared norm sits
        if not _is_norm(module):
            continue
        if name.startswith(prefixes):
            found.append((name, module, "block"))
        else:
            found.append((name, module, "final" if name.rpartition(".")[0] in parents else "outside"))
    return found


def _classify(name: str, module: nn.Module) -> _Form:
    """Which fused form reproduces this norm, found by running it on probe inputs."""
    params = dict(module.named_parameters(recurse=False))
    where = f"{type(module).__name__} at {name!r}"
    if not set(params) <= {"weight", "bias"}:
        raise ValueError(f"norm {where} has parameters {sorted(params)}; only 'weight' and 'bias' can be kept "
                         f"under their names by a fused norm")
    eps = _eps(module, params)
    if eps is None:
        raise ValueError(f"norm {where} has no {'/'.join(_EPS_ATTRIBUTES)} attribute; cannot tell its epsilon")
    hidden = full_shape(params["weight"]).numel() if "weight" in params else _declared_width(module)
    for kind, offset in _FORMS:
        if "bias" in params and kind != "layer_norm":
            continue  # the fused RMSNorm has no bias, so it cannot stand in for one with a bias
        try:
            if _behaves_like(module, params, kind, offset, eps, hidden or _PROBE_HIDDEN):
                return _Form(kind, offset, eps, hidden)
        except Exception as error:  # e.g. a norm that needs a second input (gated RMSNorm)
            raise ValueError(f"norm {where} could not be probed ({type(error).__name__}: {error}); it matches "
                             f"none of LayerNorm, RMSNorm, Gemma RMSNorm") from error
    raise ValueError(f"norm {where} (eps={eps:g}) behaves like none of LayerNorm, RMSNorm, Gemma RMSNorm "
                     f"(1 + w); refusing to patch the model")


def _eps(module: nn.Module, params: dict[str, nn.Parameter]) -> float | None:
    for attribute in _EPS_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    if isinstance(module, nn.RMSNorm):  # eps=None means the dtype's machine epsilon
        return torch.finfo(params["weight"].dtype if "weight" in params else torch.float32).eps
    return None


def _declared_width(module: nn.Module) -> int | None:
    """The width of a weightless norm, where it says (nn.LayerNorm without affine parameters)."""
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):
        return shape
    return shape[0] if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1 else None


def _behaves_like(module: nn.Module, params: dict[str, nn.Parameter], kind: str, offset: float, eps: float,
                  hidden: int) -> bool:
    """Run the norm with random weights (never its own) and compare with the fused form on CPU, fp32.

    Random weights separate w from 1 + w (Gemma initialises w to 0, others to 1); inputs with a
    non-zero mean separate LayerNorm from RMSNorm; inputs scaled to variance ~eps check eps itself.
    """
    generator = torch.Generator().manual_seed(0)
    probe = {n: torch.randn(full_shape(p), generator=generator) * 0.5 + (1.0 if n == "weight" else 0.0)
             for n, p in params.items()}
    buffers = {n: b.detach().to("cpu", torch.float32 if b.is_floating_point() else b.dtype)
               for n, b in module.named_buffers(recurse=False)}
    x = torch.randn(2, 3, hidden, generator=generator) * 2.0 + 1.0
    weight = probe.get("weight", torch.ones(hidden))
    for inputs in (x, x * math.sqrt(eps)) if eps > 0 else (x,):
        with torch.no_grad():
            actual = torch.func.functional_call(module, {**probe, **buffers}, (inputs,))
            if kind == "layer_norm":
                expected = kernels.layer_norm(inputs, weight, probe.get("bias"), eps, backend="torch")
            else:
                expected = kernels.rms_norm(inputs, weight, eps, backend="torch", weight_offset=offset)
        if not (isinstance(actual, torch.Tensor) and actual.shape == expected.shape
                and torch.allclose(actual.float(), expected, rtol=_TOLERANCE, atol=_TOLERANCE)):
            return False
    return True


def _fuse(module: nn.Module, form: _Form, layer: int, backend: str) -> FusedNorm:
    params = dict(module.named_parameters(recurse=False))
    fused = FusedNorm(params.get("weight"), params.get("bias"), form.eps, form.kind, form.weight_offset, layer,
                      backend, form.hidden)
    fused.train(module.training)  # a model patched in eval mode must not start adding noise
    return fused


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
