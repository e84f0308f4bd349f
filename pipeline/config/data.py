"""The `data:` section: the corpus, its format, the split, packing and the token cache."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.section import Section


class SplitConfig(Section):
    """Which documents are held out for evaluation. The split is by document, never inside one."""

    rule: Literal["hash", "path_number", "path_hash"] = "hash"
    """`hash`: a stable hash of the document text sends `eval_fraction` of the documents to eval;
    `path_number`: the first number `path_pattern` captures in the file name decides (documents whose
    number >= `eval_from` go to eval, e.g. the year of a speech); `path_hash`: a stable hash of the
    file name decides, so a file is all train or all eval."""
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """For `hash`: the share of documents held out."""
    path_pattern: str = r"^(\d+)"
    """For `path_number`: the regex whose first group is the number (the demo: `^(\\d{4})-`)."""
    eval_from: float | None = None
    """For `path_number`, where it is required: the first number that goes to eval (the demo: 2000)."""

    @model_validator(mode="after")
    def _check_rule_fields(self) -> SplitConfig:
        if self.rule == "path_number" and self.eval_from is None:
            raise ValueError("eval_from must be given when rule is 'path_number'")
        return self


class FieldNames(Section):
    """Where the example formats find their parts in a record."""

    messages: str = "messages"
    """`chat`: the list of `{role, content}` messages."""
    instruction: str = "instruction"
    """`instruction` (alpaca-style): the instruction."""
    input: str = "input"
    """`instruction`: the optional input."""
    output: str = "output"
    """`instruction`: the response."""
    prompt: str = "prompt"
    """`prompt_completion`: the prompt."""
    completion: str = "completion"
    """`prompt_completion`: the response."""


TEXT_FORMATS = ("text", "jsonl", "parquet", "hf")
EXAMPLE_FORMATS = ("chat", "instruction", "prompt_completion")


class DataConfig(Section):
    """The corpus: its files and format, the eval split, packing into blocks, and the token cache."""

    path: str
    """A file, a directory (all files below it) or a glob; local, or an `s3://` / `gs://` URI (a prefix,
    an object, or a glob over keys)."""
    format: Literal["text", "jsonl", "parquet", "hf", "chat", "instruction", "prompt_completion"] = "text"
    """Raw text for plain causal-LM training: `text` (one document per file), `jsonl`, `parquet`, `hf`
    (a `save_to_disk` directory), each record's `text_field`. Prompt and response examples with the
    loss on responses only (see "Instruction and chat fine-tuning"): `chat`, `instruction`,
    `prompt_completion`."""
    file_type: Literal["auto", "jsonl", "parquet", "hf"] = "auto"
    """The files an example format reads; `auto` goes by extension: `.parquet` files, an HF
    `save_to_disk` directory (`.arrow`), else JSON lines."""
    text_field: str = "text"
    """The text field for `jsonl`, `parquet` and `hf`."""
    fields: FieldNames = FieldNames()
    chat_template: str | None = None
    """A Jinja chat template for `chat`, used instead of the tokenizer's own; required when the
    tokenizer has none; the exported model carries it. None: the tokenizer's."""
    prompt_template: str = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
    """`instruction` prompts (alpaca-style by default): `{instruction}`, and `{input}`, which becomes
    `### Input:\\n<input>\\n\\n`, or nothing when the record has no input."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (system and user turns, instructions)."""
    packing: Literal["document", "naive", "none"] | None = None
    """`document`: whole examples packed into `seq_len` blocks, positions and attention restarting at
    each one; `naive`: concatenated, attention crossing examples; `none`: one example per block, padded.
    None: `document` for the example formats; raw text is always packed `naive`."""
    too_long: Literal["skip", "truncate"] = "skip"
    """An example above `seq_len` tokens: `skip` it (a `too_long` bad record), or `truncate` it to its
    first `seq_len` tokens (a bad record `no_response_left` if no response token remains)."""
    seq_len: int = Field(256, ge=8)
    """Tokens per packed block; must not exceed the model's positions."""
    split: SplitConfig = SplitConfig()
    cache_dir: str = ".cache/pipeline/data"
    """The packed token files, one directory per fingerprint; local or a URI. Ray Data actors write it
    directly and training ranks read it by range, so on more than one node it must be a URI (or a
    shared mount)."""
    tokenize_actors: int = Field(2, ge=1)
    """The tokenizing actor pool's size."""
    tokenize_batch_size: int = Field(64, ge=1)
    """Documents per tokenizing batch."""
    on_bad_record: Literal["skip", "fail"] = "skip"
    """A bad record (invalid JSON or UTF-8, empty, no text field, too large, unreadable file): `skip` it
    and count it by reason, or `fail` at the first one, naming its file and line."""
    max_document_bytes: int = Field(8 << 20, ge=1)
    """Larger documents are bad records: one is nearly always a broken export (a whole corpus on one
    line, a binary blob), and it would dominate the packed blocks. No read holds more than this."""
    chunk_bytes: int = Field(32 << 20, ge=1024)
    """The unit of parallel reading, at most (smaller when the corpus needs more chunks to keep the
    actors busy): small files are grouped up to it, larger JSONL files cut into pieces of it. It bounds
    a reader's memory, never the result: the blocks are the same."""
    verify_checksums: bool = True
    """On a cache hit, hash every token file against `meta.json` (sizes are always checked, from one
    listing). Turn off for very large caches whose reading would cost more than it protects."""

    @model_validator(mode="after")
    def _check_packing(self) -> DataConfig:
        if self.format in TEXT_FORMATS and self.packing not in (None, "naive"):
            raise ValueError(f"packing: '{self.packing}' is for the example formats ({', '.join(EXAMPLE_FORMATS)}); "
                             f"raw text is packed naively")
        if "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template: it must contain {instruction}")
        return self

    @property
    def has_examples(self) -> bool:
        """Prompt/response examples (the loss on responses only), rather than raw text."""
        return self.format in EXAMPLE_FORMATS

    @property
    def packing_mode(self) -> str:
        return self.packing or ("document" if self.has_examples else "naive")
