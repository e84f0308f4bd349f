"""Model loading: every source (HF dir, hub id, GGUF, tiny config) becomes a plain HF directory."""

from pipeline.models.load import (
    hf_dir_fingerprint,
    load_causal_lm,
    load_tokenizer,
    materialize_model,
    max_positions,
)

__all__ = ["hf_dir_fingerprint", "load_causal_lm", "load_tokenizer", "materialize_model", "max_positions"]
