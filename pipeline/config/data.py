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
    tokens: str = "tokens"
    """`tagged_tokens`: the list of words (CoNLL-2003 style, already split)."""
    tags: str = "ner_tags"
    """`tagged_tokens`: the list of tags, one per word (strings such as `B-PER`, or ids)."""


TEXT_FORMATS = ("text", "jsonl", "parquet", "hf")
EXAMPLE_FORMATS = ("chat", "instruction", "prompt_completion")
# The labelled formats and the one model.task each trains (`Config` checks that they agree).
CLASSIFICATION_FORMATS = {"labelled_text": "sequence_classification", "tagged_tokens": "token_classification"}


class DataConfig(Section):
    """The corpus: its files and format, the eval split, packing into blocks, and the token cache."""

    path: str
    """A file, a directory (all files below it) or a glob; local, or an `s3://` / `gs://` URI (a prefix,
    an object, or a glob over keys)."""
    format: Literal["text", "jsonl", "parquet", "hf", "chat", "instruction", "prompt_completion", "labelled_text",
                    "tagged_tokens"] = "text"
    """Raw text for plain causal-LM training: `text` (one document per file), `jsonl`, `parquet`, `hf`
    (a `save_to_disk` directory), each record's `text_field`. Prompt and response examples with the
    loss on responses only (see "Instruction and chat fine-tuning"): `chat`, `instruction`,
    `prompt_completion`. Labelled records for the classification tasks (see "Classification"):
    `labelled_text` (`text_field` and `label_field`, for `model.task: sequence_classification`),
    `tagged_tokens` (`fields.tokens` and `fields.tags`, for `token_classification`)."""
    file_type: Literal["auto", "jsonl", "parquet", "hf"] = "auto"
    """The files an example format reads; `auto` goes by extension: `.parquet` files, an HF
    `save_to_disk` directory (`.arrow`), else JSON lines."""
    text_field: str = "text"
    """The text field for `jsonl`, `parquet`, `hf` and `labelled_text`."""
    label_field: str = "label"
    """`labelled_text`: each record's class, a string or an int."""
    label_names: list[str] | None = None
    """The classes in id order, where the records give ids (as a Hugging Face `ClassLabel` names them):
    id i is `label_names[i]`, an id given as an int or its decimal string; each name once. Needed for
    `tagged_tokens` whose tags are ids (entities are read off the `B-`/`I-` names). None: the classes
    are the labels the training split holds, sorted (as numbers when they all are), each given as a
    string or an int."""
    subword_labels: Literal["first", "all"] = "first"
    """`tagged_tokens`: which sub-word tokens of a word carry its tag. `first`: the first, the others
    -100 (not trained, not scored); `all`: every one, a `B-` tag continuing as `I-` (as `run_ner.py`'s
    `label_all_tokens`)."""
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
    None: `document` for the example formats, `none` (the only choice) for the labelled ones; raw text
    is always packed `naive`."""
    too_long: Literal["skip", "truncate"] | None = None
    """An example above `seq_len` tokens: `skip` it (a `too_long` bad record), or `truncate` it to its
    first `seq_len` tokens (a bad record `no_response_left` if no response token remains). None:
    `truncate` for the labelled formats, `skip` for the others."""
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
        if self.is_labelled and self.packing not in (None, "none"):
            raise ValueError(f"packing: '{self.packing}' packs examples together; the labelled formats "
                             f"({', '.join(CLASSIFICATION_FORMATS)}) put one example in each block (none)")
        if self.label_names is not None and len(set(self.label_names)) < 2:
            raise ValueError(f"label_names: a classifier needs at least 2 distinct classes, got {self.label_names}")
        if self.label_names is not None and len(set(self.label_names)) < len(self.label_names):
            twice = sorted({name for name in self.label_names if self.label_names.count(name) > 1})
            raise ValueError(f"label_names: each class once (an id per name); {', '.join(twice)} repeated")
        if "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template: it must contain {instruction}")
        return self

    @property
    def has_examples(self) -> bool:
        """Prompt/response examples (the loss on responses only), rather than raw text."""
        return self.format in EXAMPLE_FORMATS

    @property
    def is_labelled(self) -> bool:
        """Records with a class per example or a tag per word, for the classification tasks."""
        return self.format in CLASSIFICATION_FORMATS

    @property
    def reads_records(self) -> bool:
        """Each record's fields are read whole (example and labelled formats), not one text field."""
        return self.has_examples or self.is_labelled

    @property
    def packing_mode(self) -> str:
        if self.is_labelled:
            return "none"
        return self.packing or ("document" if self.has_examples else "naive")

    @property
    def too_long_mode(self) -> str:
        return self.too_long or ("truncate" if self.is_labelled else "skip")
