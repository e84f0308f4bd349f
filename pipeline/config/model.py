"""The `model:` section: where the model and its tokenizer come from, and LoRA."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.section import Section


class LoraConfig(Section):
    """LoRA (peft) adapters on the model's Linear layers, the base weights frozen (see "LoRA"). Off by
    default (`model.lora` is none: full fine-tuning); setting any `model.lora.*` field switches it on
    with the defaults below, `model.lora=null` switches it off."""

    r: int = Field(8, ge=1)
    """The adapters' rank."""
    alpha: float = Field(16.0, gt=0)
    """The update is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input. It draws from torch's RNG per rank, so a run with dropout > 0 is
    not the same run on 1 and N workers (the rest of the run is)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """The Linear layers that get adapters, by name or last name parts as peft matches them
    (`[q_proj, v_proj]`); `all-linear`: every Linear layer but the output head. A name that matches no
    Linear layer is a config error listing the model's."""
    modules_to_save: list[str] = []
    """Modules trained whole beside the adapters (e.g. `lm_head`), saved in the adapter (peft's
    `modules_to_save`)."""
    train_norms: bool = False
    """Also train the fused norms' weights (saved in the adapter); frozen otherwise."""


TASKS = ("causal_lm", "sequence_classification", "token_classification")


class ModelConfig(Section):
    """Where the model and its tokenizer come from."""

    task: Literal["causal_lm", "sequence_classification", "token_classification"] = "causal_lm"
    """What the model learns, and so its head (`AutoModelFor...`): `causal_lm`, the next token;
    `sequence_classification`, a class per example (`data.format: labelled_text`);
    `token_classification`, a tag per word (`data.format: tagged_tokens`). A classification head is new
    (randomly initialised, sized to the training split's classes) on an encoder such as BERT; see
    "Classification"."""
    source: Literal["hf_dir", "hub", "gguf", "config"]
    """`hf_dir`: a Hugging Face model directory; `hub`: a hub repo id; `gguf`: a `.gguf` file;
    `config`: a tiny model built from `architecture`, with a tokenizer trained on `tokenizer_corpus` (for a
    classification task a bare encoder, e.g. `model_type: bert`, and a WordPiece tokenizer)."""
    path: str | None = None
    """The directory, hub id or `.gguf` file (not for `config`); a local path (`package:NAME/...` points
    inside an installed Python package without importing it) or an `s3://` / `gs://` URI (copied once
    to node-local disk)."""
    architecture: dict[str, Any] | None = None
    """For `config`: Hugging Face config kwargs, including `model_type`."""
    tokenizer_corpus: str | None = None
    """For `config`: the text files (a glob) the tokenizer is trained on: byte-level BPE for `causal_lm`,
    uncased WordPiece with BERT's `[CLS]`/`[SEP]`/`[PAD]`/`[UNK]`/`[MASK]` for the classification tasks."""
    tokenizer_vocab_size: int = Field(512, ge=64)
    """For `config`: the trained tokenizer's vocabulary size."""
    init_seed: int = 0
    """For `config`: the weight init seed."""
    cache_dir: str = ".cache/pipeline/models"
    """Converted GGUF and built tiny models; a URI shares them with every node."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    """The attention kernel transformers uses; none keeps the model's default (`sdpa` where it has
    one). `flash_attention_2` needs a GPU and the flash-attn package."""
    lora: LoraConfig | None = None  # None: full fine-tuning

    @model_validator(mode="after")
    def _check_source_fields(self) -> ModelConfig:
        if self.source == "config":
            if not self.architecture or "model_type" not in self.architecture:
                raise ValueError("architecture must be given, with a model_type, when source is 'config'")
            if not self.tokenizer_corpus:
                raise ValueError("tokenizer_corpus must be given when source is 'config'")
        elif not self.path:
            raise ValueError(f"path must be given when source is '{self.source}'")
        return self
