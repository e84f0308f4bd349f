"""Turn a (possibly ZeRO-partitioned) DeepSpeed checkpoint into a plain HF model directory, stored
beside the run: `<train.output_dir>/<run>/model` on local disk or in object storage."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import console, storage
from pipeline.cache import cached_dir, stable_hash
from pipeline.config import Config, LoraConfig, is_uri
from pipeline.tracking import RunTarget
from pipeline.train.checkpoints import WHOLE_MODULE_FILE, CheckpointError, local_checkpoint, local_tag, problem_with
from pipeline.train.precision import training_dtype
from pipeline.train.schedule import deepspeed_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportedModel:
    local_dir: Path  # the HF directory on the node that exported it (in a Ray task: maybe not this one)
    location: str  # where it is stored: local_dir itself, or the object-storage URI it was uploaded to
    model_uri: str | None = None  # MLflow's, when the export logged it
    adapter_location: str | None = None  # under LoRA: the peft adapter directory, beside the merged model
    adapter_dir: Path | None = None  # its local copy, on the node that exported it
    adapter_uri: str | None = None  # MLflow's, when the export logged it


@dataclass(frozen=True)
class Head:
    """What an exported model predicts: the next token (`causal_lm`), or a classifier's classes."""

    task: str = "causal_lm"  # model.task
    label_names: tuple[str, ...] = ()  # a classifier's label map, the classes in id order

    @property
    def is_classifier(self) -> bool:
        return self.task != "causal_lm"

    def check(self) -> None:
        if self.is_classifier and len(self.label_names) < 2:
            raise ValueError(f"export: a {self.task} model needs its label map (PreparedData.label_names), "
                             f"got {list(self.label_names)}")


LM_HEAD = Head()

# The export task's own footprint (Python, torch, transformers, DeepSpeed) beside the shard it holds.
EXPORT_PROCESS_BYTES = 2 * 2**30


def export_in_task(cfg: Config, checkpoint: str, model_ref: str, location: str,
                   log_to: RunTarget | None = None, label_names: tuple[str, ...] = ()) -> ExportedModel:
    """`export_model` (and logging the result to MLflow run `log_to`) as a Ray task that declares the
    memory it needs, so that on a cluster it runs on a node that has it rather than on the driver
    (a RayJob's head is small). On a one-node Ray the driver's machine is that node: it runs here,
    without a worker process that would first import torch, transformers and DeepSpeed again.
    `label_names`: a classifier's label map (`PreparedData.label_names`), which its config names."""
    import ray

    if sum(node["Alive"] for node in ray.nodes()) <= 1:
        return _export_and_log(cfg, checkpoint, model_ref, location, log_to, label_names)
    memory = EXPORT_PROCESS_BYTES + int(1.5 * cfg.train.export_shard_mb * 2**20)
    task = ray.remote(num_cpus=1, memory=memory, max_retries=0)(_export_and_log)
    try:
        return ray.get(task.remote(cfg, checkpoint, model_ref, location, log_to, label_names))
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, (CheckpointError, FileExistsError, ValueError)):
            raise cause from None  # its own one-line message, not the task's traceback
        raise


def _export_and_log(cfg: Config, checkpoint: str, model_ref: str, location: str,
                    log_to: RunTarget | None, label_names: tuple[str, ...]) -> ExportedModel:
    from pipeline import tracking

    storage.configure(cfg.storage)  # a Ray worker has the driver's settings only through the config
    steps = ["consolidating the checkpoint into a Hugging Face model", *(["logging the model to MLflow"] if log_to else [])]
    console.progress("export", 0, len(steps), [steps[0]])
    exported = export_model(checkpoint, model_ref, location, training_dtype(deepspeed_config(cfg.train)),
                            cfg.train.export_shard_mb * 2**20, cfg.data.chat_template, cfg.model.lora,
                            Head(cfg.model.task, tuple(label_names)))
    if log_to is None:
        console.progress("export", 1, 1, [f"model at {exported.location}"])
        return exported
    console.progress("export", 1, 2, [steps[1]])
    if cfg.model.task == "causal_lm":
        model_uri = tracking.log_hf_model(log_to, exported.local_dir, cfg.tracking.max_new_tokens,
                                          chat=cfg.data.format == "chat")
    else:
        model_uri = tracking.log_classifier(log_to, exported.local_dir, cfg.model.task)
    adapter_uri = None
    if exported.adapter_dir is not None:
        adapter_uri = tracking.log_adapter(log_to, exported.adapter_dir, model_ref)
    console.progress("export", 2, 2, [f"model logged as {model_uri}"])
    return dataclasses.replace(exported, model_uri=model_uri, adapter_uri=adapter_uri)


def adapter_location(location: str) -> str:
    """Where a LoRA run's adapter directory goes: beside its merged model (`.../model-adapter`)."""
    return location.rstrip("/") + "-adapter"


def export_model(checkpoint: str, model_ref: str, location: str, dtype: torch.dtype = torch.float32,
                 shard_bytes: int = 2 * 2**30, chat_template: str | None = None,
                 lora: LoraConfig | None = None, head: Head = LM_HEAD) -> ExportedModel:
    """Verify the final checkpoint, rebuild full weights from it on this machine one shard at a time,
    and store the HF directory at `location` (a URI gets an upload whose config.json comes last, so
    that a reader who finds config.json finds a complete model). An export never overwrites another
    run's model; `chat_template` (the one training rendered with) replaces the tokenizer's own.
    Under `lora` the model is the base with the adapter merged in, and the adapter directory itself
    is stored beside it (`adapter_location`). `head`: what the model predicts (a classifier's
    classes go into its config)."""
    head.check()
    location = storage.resolve(location)
    adapter_at = adapter_location(location) if lora is not None else None
    for taken in filter(None, (location, adapter_at)):
        if storage.exists(taken):
            raise FileExistsError(f"{taken} already exists; an export never overwrites another run's model")
    started = time.perf_counter()
    local_dir = _staging_dir(location) if is_uri(location) else Path(location)
    with local_checkpoint(checkpoint) as directory:
        problem = problem_with(directory)  # a downloaded copy is checked as it was read: one read in all
        if problem:
            raise CheckpointError(f"the final checkpoint {checkpoint} is corrupt or partial: {problem}")
        export_hf_model(directory, model_ref, local_dir, dtype, shard_bytes, chat_template, lora, head)
        adapter_dir = _export_adapter(directory, model_ref, adapter_at, dtype, lora) if lora else None
    if is_uri(location):
        from pipeline.models.load import upload_model_dir

        upload_model_dir(local_dir, location)
    log.info("exported consolidated model to %s in %.1fs", location, time.perf_counter() - started)
    return ExportedModel(local_dir=local_dir, location=location, adapter_location=adapter_at, adapter_dir=adapter_dir)


def _export_adapter(checkpoint_dir: Path, model_ref: str, location: str, dtype: torch.dtype, lora: LoraConfig) -> Path:
    """The trained adapter (and the modules trained whole) as a peft adapter directory at `location`
    (a URI gets an upload whose adapter_config.json comes last); its local copy."""
    from pipeline.models.lora import CONFIG_FILE, write_adapter

    local_dir = _staging_dir(location) if is_uri(location) else Path(location)
    weights = trained_weights(checkpoint_dir)
    cached_dir(local_dir.parent, local_dir.name, lambda tmp: write_adapter(weights, lora, model_ref, tmp, dtype))
    if is_uri(location):
        storage.upload_dir(local_dir, location, last=[CONFIG_FILE])
    return local_dir


def _staging_dir(location: str) -> Path:
    """This node's local copy of a model exported to object storage. Only an earlier export to the
    same location, which failed before its upload ended, can have left one: it is replaced."""
    staging = storage.local_cache_root() / "exports" / stable_hash(location)
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def trained_weights(checkpoint_dir: Path) -> dict:
    """The full weights of a local DeepSpeed checkpoint, by name, without reading them: each value
    becomes a tensor in memory only when asked (`.contiguous()`), from memory-mapped files.

    Stages 0-2 store the module whole (in the dtype it trained in, which equals the fp32 master
    weights when it trained in fp32). ZeRO-3 stores only partitions: each weight is gathered from
    every rank's optimizer partition of the fp32 master weights as it is asked for."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = local_tag(checkpoint_dir)
    whole = checkpoint_dir / tag / WHOLE_MODULE_FILE
    if whole.is_file():
        return torch.load(whole, map_location="cpu", mmap=True, weights_only=False)["module"]
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, lazy_mode=True)


def export_hf_model(checkpoint_dir: Path, model_ref: str, out_dir: Path, dtype: torch.dtype = torch.float32,
                    shard_bytes: int = 2 * 2**30, chat_template: str | None = None,
                    lora: LoraConfig | None = None, head: Head = LM_HEAD) -> Path:
    """Write the trained weights (as `dtype`, in safetensors shards of at most `shard_bytes`, one
    shard in memory at a time), config and tokenizer as a local HF directory (atomically). Under
    `lora` the checkpoint holds only what trained: each weight is the base model's, read from its
    files, with its adapter merged in. A classifier's config gets its label map (`id2label`,
    `label2id`) and the architecture it trained as."""
    from transformers import AutoConfig

    from pipeline.models import label_maps, load_tokenizer, local_model
    from pipeline.models.weights import ShardWriter

    head.check()
    weights = trained_weights(checkpoint_dir)
    config = AutoConfig.from_pretrained(local_model(model_ref, weights=False))
    if head.is_classifier:  # before the layout: the head's shape is the number of classes
        config.update(label_maps(head.label_names))
    names, tied, architecture = _stored_layout(config, head.task)
    if head.is_classifier:  # an encoder's own config names its bare model (BertModel), not the classifier
        config.architectures = [architecture]
    tensors = _lora_merged(names, weights, model_ref, lora) if lora else _whole(names, tied, weights)

    def build(tmp: Path) -> None:
        writer = ShardWriter(tmp, shard_bytes)
        for name, tensor in tensors:
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        writer.close()
        config.dtype = dtype
        config.save_pretrained(tmp)
        tokenizer = load_tokenizer(model_ref, needs_eos=False)  # packing needs one; an export packs nothing
        if chat_template:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(tmp)

    out_dir = Path(out_dir)
    if out_dir.exists():  # cached_dir would return it as is: never hand back another run's model
        raise FileExistsError(f"{out_dir} already exists; an export never overwrites another run's model")
    return cached_dir(out_dir.parent, out_dir.name, build)


def _whole(names: list[str], tied: set[str], weights: dict):
    missing, unexpected = sorted(set(names) - set(weights)), sorted(set(weights) - set(names) - tied)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return ((name, weights[name].contiguous()) for name in names)


def _lora_merged(names: list[str], weights: dict, model_ref: str, lora: LoraConfig):
    from pipeline.models import local_model
    from pipeline.models.lora import base_weights_changed, merged_tensors
    from pipeline.models.weights import WeightFiles

    base = WeightFiles(local_model(model_ref))
    unknown = sorted(base_weights_changed(weights) - set(names))
    missing = sorted(set(names) - set(base.tensors))
    if unknown or missing:
        raise RuntimeError(f"the LoRA checkpoint does not match the base model: trained {unknown[:5]} unknown to it, "
                           f"{missing[:5]} not in its files")
    return merged_tensors(names, lambda name: base.read(name).view(base.tensors[name].shape), weights, lora)


def _stored_layout(config, task: str) -> tuple[list[str], set[str], str]:
    """What `save_pretrained` stores, in order (the state dict but for tied duplicates), the tied
    duplicates (e.g. lm_head tied to the embeddings) and the model's class name, found on the meta
    device: no weight allocated."""
    from pipeline.models import auto_model_class

    with torch.device("meta"):
        model = auto_model_class(task).from_config(config)
    unique = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
    return [name for name in model.state_dict() if name not in tied], tied, type(model).__name__
