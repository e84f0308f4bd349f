"""LoRA adapters (peft) on a fused-norm model: which layers get them, what trains, and how a trained
adapter becomes a peft adapter directory and a merged model, one tensor at a time.

Training wraps the model with `peft.get_peft_model` after the norms are patched, so the fused norms
(and their noise) run unchanged inside it. What trains beside the adapters (`modules_to_save`, the
norms with `train_norms`) is unfrozen in place rather than through peft's `modules_to_save` wrapper,
which deep-copies the module: a copy of a ZeRO-3 partitioned parameter is not a parameter ZeRO-3
knows. The adapter directory still names them in `modules_to_save`, so peft loads them back.

Names: the trained model's parameters are peft's (`base_model.model.<base name>` for everything,
`...q_proj.lora_A.default.weight` for an adapter); peft's adapter file drops the adapter name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError, LoraConfig

PREFIX = "base_model.model."
ADAPTER = "default"  # peft's name for the one adapter a model has
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
ALL_LINEAR = "all-linear"


def peft_config(cfg: LoraConfig, base_ref: str | None = None, modules_to_save: list[str] | None = None):
    import peft

    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                           target_modules=cfg.target_modules, modules_to_save=modules_to_save or None,
                           base_model_name_or_path=base_ref)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """The model under LoRA adapters (a peft model), with only the adapters, `modules_to_save` and,
    with `train_norms`, the fused norms trainable. Adapters take the model's dtype (peft would make
    them fp32, which a bf16 DeepSpeed engine refuses)."""
    import peft

    check_targets(model, cfg)
    wrapped = peft.get_peft_model(model, peft_config(cfg), autocast_adapter_dtype=False)
    for name in fully_trained_modules(model, cfg):
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    wrapped._register_state_dict_hook(_drop_frozen)
    return wrapped


def _drop_frozen(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The training model's state dict holds only what trains: what a checkpoint saves. DeepSpeed's
    `exclude_frozen_parameters` drops frozen weights by `named_parameters()`, which lists a tied
    weight once, so a tied duplicate (SmolLM2's lm_head, 113 MB) would still be saved."""
    for name, param in module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False):
        if not param.requires_grad:
            state_dict.pop(name, None)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, counted at their full size also when ZeRO-3 has partitioned them."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)


def _matches(name: str, wanted: str) -> bool:
    """peft's rule: a module is named by its full name or by its last dotted parts."""
    return name == wanted or name.endswith("." + wanted)


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def check_targets(model: nn.Module, cfg: LoraConfig) -> None:
    """Every named target is a Linear layer of this model, every module to save exists: else a
    one-line error naming the field and what the model has."""
    linear = _linear_names(model)
    if cfg.target_modules != ALL_LINEAR:
        known = sorted({name.rpartition(".")[2] for name in linear})
        for wanted in cfg.target_modules:
            if not any(_matches(name, wanted) for name in linear):
                raise ConfigError(f"model.lora.target_modules: '{wanted}' names no Linear layer of the model "
                                  f"(its Linear layers: {', '.join(known)})")
    names = [name for name, _ in model.named_modules() if name]
    for wanted in cfg.modules_to_save:
        if not any(_matches(name, wanted) for name in names):
            raise ConfigError(f"model.lora.modules_to_save: '{wanted}' names no module of the model")


def check_lora(cfg: LoraConfig | None, model_ref: str) -> None:
    """`check_targets` on the driver, against the model built on the meta device (no weights read)."""
    if cfg is None:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models.load import local_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local_model(model_ref, weights=False)))
    check_targets(model, cfg)


def fully_trained_modules(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The modules (base names) trained whole: `modules_to_save`, plus the fused norms with `train_norms`."""
    from pipeline.models.patch import FusedNorm

    names = [name for name, module in model.named_modules() if name and (
        any(_matches(name, wanted) for wanted in cfg.modules_to_save)
        or (cfg.train_norms and isinstance(module, FusedNorm)))]
    return [name for name in names if not any(name.startswith(other + ".") for other in names)]


def adapter_key(trained_name: str) -> str:
    """A trained parameter's name in peft's adapter file (the adapter's own name dropped)."""
    return trained_name.replace(f".{ADAPTER}.", ".")


def is_adapter(trained_name: str) -> bool:
    return ".lora_A." in trained_name or ".lora_B." in trained_name


def write_adapter(trained: dict[str, torch.Tensor], cfg: LoraConfig, base_ref: str, out_dir: Path,
                  dtype: torch.dtype) -> Path:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors) from the trained
    parameters: `PeftModel.from_pretrained(base, out_dir)` loads it. Modules trained whole are listed
    in its modules_to_save, by their full base names."""
    from safetensors.torch import save_file

    saved = sorted({_module_of(name.removeprefix(PREFIX)) for name in trained if not is_adapter(name)})
    tensors = {adapter_key(name): value.contiguous().to(dtype) for name, value in trained.items()}
    save_file(tensors, str(out_dir / ADAPTER_FILE), metadata={"format": "pt"})
    peft_config(cfg, base_ref, saved).save_pretrained(str(out_dir))
    config = json.loads((out_dir / CONFIG_FILE).read_text())
    config["inference_mode"] = True
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def _module_of(parameter_name: str) -> str:
    return parameter_name.rpartition(".")[0]


def base_weights_changed(trained: dict[str, torch.Tensor]) -> set[str]:
    """The base model's weights (stored names) that the trained parameters change: each adapted
    Linear's weight, and every parameter of a module trained whole."""
    return {name.removeprefix(PREFIX).partition(".lora_")[0] + ".weight" if is_adapter(name)
            else name.removeprefix(PREFIX) for name in trained}


def merged_tensors(names: list[str], read_base, trained: dict[str, torch.Tensor], cfg: LoraConfig
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Each base weight (by its stored name) with its adapter merged in, W + (alpha/r)·B·A, or its
    trained value when it was trained whole; one tensor at a time (`read_base(name)` reads one)."""
    scale = cfg.alpha / cfg.r
    for name in names:
        module, _, leaf = name.rpartition(".")
        whole = trained.get(PREFIX + name)
        if whole is not None:
            yield name, whole.contiguous()
            continue
        base = read_base(name)
        down = trained.get(f"{PREFIX}{module}.lora_A.{ADAPTER}.weight")
        if leaf != "weight" or down is None:
            yield name, base
            continue
        up = trained[f"{PREFIX}{module}.lora_B.{ADAPTER}.weight"]
        delta = (up.contiguous().float() @ down.contiguous().float()) * scale
        yield name, (base.float() + delta).to(base.dtype)
