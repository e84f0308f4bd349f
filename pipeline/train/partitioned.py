"""ZeRO-3 loading in which no rank ever holds the whole model.

The model is built under `deepspeed.zero.Init`, which partitions each module's parameters as soon as
the module exists (weight initialisation is skipped: every value comes from the files). Then each
rank reads, straight from the safetensors files, only the elements of each parameter that its own
partition holds: one seek and one read per parameter, no collective, and 1/N of the bytes.
(Transformers' own ZeRO-3 path makes rank 0 read the whole state dict and broadcast it.)

A partition swapped to NVMe has no resident buffer to fill, so those parameters are gathered one at
a time and rank 0 fills them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.train.precision import training_dtype


def load_partitioned_causal_lm(model_ref: str, ds_config: dict, attn_implementation: str | None = None):
    """The HF causal LM at `model_ref`, its parameters partitioned across the ranks as ZeRO-3
    (`ds_config`) partitions them, each rank holding and reading only its own share."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from pipeline.models import local_model
    from pipeline.models.weights import WeightFiles

    if not deepspeed.comm.is_initialized():
        # zero.Init reads the world size from deepspeed.comm (else it assumes 1 and rejects the batch
        # sizes); this wraps the torch.distributed group that Ray Train (or train.local) made.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False,
                                   verbose=False)
    directory = Path(local_model(model_ref))
    files = WeightFiles(directory)
    config = AutoConfig.from_pretrained(directory)
    chosen = {"attn_implementation": attn_implementation} if attn_implementation else {}
    dtype = training_dtype(ds_config)
    # zero.Init is given no dtype: it then reads it from the config's bf16/fp16 sections, as `dtype`
    # does. An explicit dtype is dropped on CPUs without oneDNN fp16 (DeepSpeed 0.19.8's
    # Init._set_dtype), which built fp32 runs in bf16 (bench/README.md, "Upstream bugs worked around").
    # prevent_arange_dtype_change keeps RoPE's fp32 position buffers out of zero.Init's dtype cast.
    with prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=None), \
            no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **chosen)
    model.tie_weights()  # skipped with the weight initialisation
    _fill(model, files)
    return model


def _fill(model: torch.nn.Module, files) -> None:
    names = _stored_names(model, files)
    for param in model.parameters():  # each shared (tied) parameter once
        stored = names[id(param)]
        if getattr(param.ds_tensor, "final_location", None) is None:
            _fill_own_partition(param, files, stored)
        else:
            _fill_gathered(param, files, stored)
    for name, buffer in model.named_buffers():
        if name in files.tensors:  # persistent buffers; the others were computed by the model's __init__
            with torch.no_grad():
                buffer.copy_(files.read(name).view(buffer.shape))


def _stored_names(model: torch.nn.Module, files) -> dict[int, str]:
    """The stored name of every parameter, by id: a tied parameter is found under any of its names,
    and a checkpoint saved without the base model's prefix is matched too."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    found: dict[int, str] = {}
    missing = []
    for name, param in model.named_parameters(remove_duplicate=False):
        candidates = (name, name.removeprefix(prefix))
        stored = next((c for c in candidates if c in files.tensors), None)
        if stored is not None:
            found.setdefault(id(param), stored)
    for name, param in model.named_parameters():
        if id(param) not in found:
            missing.append(name)
            continue
        stored = files.tensors[found[id(param)]]
        if stored.numel != param.ds_numel:
            raise ValueError(f"model.path: weight {found[id(param)]} has shape {stored.shape}, the model's config "
                             f"wants {tuple(param.ds_shape)}")
    if missing:
        raise ValueError(f"model.path: the safetensors files have no weights for {', '.join(missing[:5])}"
                         f"{' and more' if len(missing) > 5 else ''}")
    return found


def _fill_own_partition(param: torch.nn.Parameter, files, stored: str) -> None:
    """This rank's share: elements [r·P, (r+1)·P) of the flattened parameter (P = the partition size,
    the last share padded), as ZeRO-3 lays them out."""
    import torch.distributed as dist

    partition = param.ds_tensor
    start = partition.ds_numel * dist.get_rank(group=param.ds_process_group)
    stop = min(start + partition.ds_numel, param.ds_numel)
    if start < stop:
        with torch.no_grad():
            partition.narrow(0, 0, stop - start).copy_(files.read(stored, start, stop))


def _fill_gathered(param: torch.nn.Parameter, files, stored: str) -> None:
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if dist.get_rank() == 0:
            with torch.no_grad():
                param.copy_(files.read(stored).view(param.shape))
