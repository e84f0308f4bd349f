"""Turn a (possibly ZeRO-partitioned) DeepSpeed checkpoint into a plain HF model directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.cache import cached_dir


log = logging.getLogger(__name__)


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage (0 stores them whole)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (checkpoint_dir / "pipeline_tag").read_text().strip()
    if any((checkpoint_dir / tag).glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    states = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_hf_model(checkpoint_dir: Path, model_ref: str, out_dir: Path) -> Path:
    """Write the trained weights, config and tokenizer as a HF directory (atomically)."""
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
