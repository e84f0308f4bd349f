"""The NEFTune noise site: a forward hook on the model's input embedding (`pipeline.noise.neftune`).

A hook, rather than a wrapper module, keeps the embedding's class, parameters and state_dict keys,
and Hugging Face forward signatures unchanged: like the fused norms, the hook reads the micro step's
noise from the noise context. The noise is added to the embedding's output and does not depend on
it, so gradients flow straight through it. Attach before `deepspeed.initialize`, with the norms.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline import kernels
from pipeline.noise import active_neftune_context, embedding_key, neftune_scale

__all__ = ["attach_embedding_noise"]

_ATTACHED = "_pipeline_embedding_noise"  # marks an embedding that has the hook, so it is never added twice


def attach_embedding_noise(model: nn.Module) -> nn.Module:
    """Hook NEFTune noise onto `model.get_input_embeddings()`; the embedding module. It adds noise only
    in training mode under a context with neftune_alpha > 0: evaluation is always noise-free."""
    embedding = model.get_input_embeddings()
    if not getattr(embedding, _ATTACHED, False):
        embedding.register_forward_hook(_add_noise)
        setattr(embedding, _ATTACHED, True)
    return embedding


def _add_noise(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    context = active_neftune_context() if module.training else None
    if context is None:
        return None  # the output unchanged
    if context.example_lengths is None:
        raise ValueError("noise: neftune_alpha > 0 needs the example lengths of the micro batch in the noise context")
    d = output.shape[-1]  # the output's, not the weight's: ZeRO-3 partitions the weight
    uniforms = kernels.signed_uniform(embedding_key(context), context.row_ids(output.shape[:-1]), d)
    scale = neftune_scale(context.neftune_alpha, context.example_lengths, d).to(uniforms.device)
    return output + (uniforms * scale.unsqueeze(-1)).to(output.dtype)
