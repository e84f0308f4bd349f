"""Turn a (possibly ZeRO-partitioned) DeepSpeed checkpoint into a plain HF model directory, stored
beside the run: `<train.output_dir>/<run>/model` on local disk or in object storage."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import storage
from pipeline.cache import cached_dir, stable_hash
from pipeline.config import is_uri
from pipeline.train.checkpoints import CheckpointError, local_checkpoint, problem_with

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportedModel:
    local_dir: Path  # a HF directory on this machine (MLflow logs the model from it)
    location: str  # where it is stored: local_dir itself, or the object-storage URI it was uploaded to


def export_model(checkpoint: str, model_ref: str, location: str) -> ExportedModel:
    """Verify the final checkpoint, rebuild full weights from it on this machine, and store the HF
    directory at `location` (a URI gets an upload whose config.json comes last, so that a reader who
    finds config.json finds a complete model). An export never overwrites another run's model."""
    location = storage.resolve(location)
    if storage.exists(location):
        raise FileExistsError(f"{location} already exists; an export never overwrites another run's model")
    started = time.perf_counter()
    local_dir = _staging_dir(location) if is_uri(location) else Path(location)
    with local_checkpoint(checkpoint) as directory:
        problem = problem_with(directory)  # a downloaded copy is checked as it was read: one read in all
        if problem:
            raise CheckpointError(f"the final checkpoint {checkpoint} is corrupt or partial: {problem}")
        export_hf_model(directory, model_ref, local_dir)
    if is_uri(location):
        from pipeline.models.load import upload_model_dir

        upload_model_dir(local_dir, location)
    log.info("exported consolidated model to %s in %.1fs", location, time.perf_counter() - started)
    return ExportedModel(local_dir=local_dir, location=location)


def _staging_dir(location: str) -> Path:
    """This node's local copy of a model exported to object storage. Only an earlier export to the
    same location, which failed before its upload ended, can have left one: it is replaced."""
    staging = storage.local_cache_root() / "exports" / stable_hash(location)
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a local DeepSpeed checkpoint of any ZeRO stage (0 stores them whole)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (checkpoint_dir / "pipeline_tag").read_text().strip()
    if any((checkpoint_dir / tag).glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    states = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_hf_model(checkpoint_dir: Path, model_ref: str, out_dir: Path) -> Path:
    """Write the trained weights, config and tokenizer as a local HF directory (atomically)."""
    from pipeline.models import load_causal_lm, load_tokenizer

    state = consolidated_state_dict(checkpoint_dir)

    def build(tmp: Path) -> None:
        model = load_causal_lm(model_ref)
        missing, unexpected = model.load_state_dict(state, strict=False)
        untied_missing = set(missing) - _tied_names(model)
        if unexpected or untied_missing:
            raise RuntimeError(f"checkpoint does not match the model: missing {sorted(untied_missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
        model.tie_weights()
        model.save_pretrained(tmp)
        load_tokenizer(model_ref).save_pretrained(tmp)

    out_dir = Path(out_dir)
    if out_dir.exists():  # cached_dir would return it as is: never hand back another run's model
        raise FileExistsError(f"{out_dir} already exists; an export never overwrites another run's model")
    return cached_dir(out_dir.parent, out_dir.name, build)


def _tied_names(model) -> set[str]:
    """Weights that share storage with another (e.g. lm_head tied to the embeddings): checkpoints
    store them once, under the other name."""
    unique = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
