"""Model loading: every source (HF dir, hub id, GGUF, tiny config) becomes a plain HF directory.

`patch_norms` then swaps a loaded model's block and final norms for fused, noise-aware ones, and
`attach_embedding_noise` hooks NEFTune noise onto its input embedding.
"""

from pipeline.models.embedding_noise import attach_embedding_noise
from pipeline.models.load import (
    auto_model_class,
    hf_dir_fingerprint,
    label_maps,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    local_model,
    materialize_model,
    max_positions,
)
from pipeline.models.patch import FusedNorm, NormPatchReport, patch_norms, patch_norms_with_report

__all__ = ["FusedNorm", "NormPatchReport", "attach_embedding_noise", "auto_model_class", "hf_dir_fingerprint",
           "label_maps", "load_causal_lm", "load_classifier", "load_tokenizer", "local_model", "materialize_model",
           "max_positions", "patch_norms", "patch_norms_with_report"]
