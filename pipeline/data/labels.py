"""Labelled records for the classification tasks: the label map, a record's labels, and ids + labels.

- `labelled_text`: a text and its class, encoded with the tokenizer's special tokens ([CLS] ... [SEP]);
  the class id sits on the first token (what the sequence head reads off the block), -100 elsewhere.
- `tagged_tokens`: words and one tag per word (CoNLL-2003 style), encoded as pre-split words; each
  word's tag goes to its first sub-word token, the others get -100, or with `data.subword_labels: all`
  every sub-word token does, a `B-` tag continuing as `I-` (as Hugging Face's `run_ner.py` aligns).

Both are stored as the example formats are, (id, label) int32 pairs, one example per block, padded
(`pipeline.data.blocks`). A label is a string or an int, and an int is its decimal string: the label
map is over strings, built from the training split's labels (or fixed by `data.label_names`), in
sorted order, numerically when every label is a number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.config import ConfigError, DataConfig
from pipeline.data.blocks import IGNORE
from pipeline.data.examples import BadExample, Example


def label_key(value) -> str | None:
    """A label as the map knows it: a string as is, an int as its decimal string; None for anything
    else (a float, a bool, a list, null), which is a `bad_label` record."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


@dataclass(frozen=True)
class LabelMap:
    """The classes in id order: id i is `names[i]`."""

    names: tuple[str, ...]

    @classmethod
    def from_labels(cls, seen: Iterable[str], what: str) -> LabelMap:
        """The map of the labels the training split holds (`what` names them in the error)."""
        distinct = set(seen)
        if len(distinct) < 2:
            raise ConfigError(f"{what}: the training split holds {len(distinct)} class{'es' if len(distinct) != 1 else ''} "
                              f"({', '.join(sorted(distinct)) or 'none'}); a classifier needs at least 2")
        if all(_is_integer(name) for name in distinct):  # by value; "1" before "01" (equal values), always
            return cls(tuple(sorted(distinct, key=lambda name: (int(name), name))))
        return cls(tuple(sorted(distinct)))

    def id_of(self, name: str) -> int | None:
        return self._ids.get(name)

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.names)}

    def id2label(self) -> dict[int, str]:
        """As a Hugging Face config keeps it (`config.id2label`)."""
        return dict(enumerate(self.names))

    def continuation_ids(self) -> list[int]:
        """For each id, the id its tag takes on a word's later sub-word tokens: `B-X` -> `I-X` where the
        map has `I-X`, every other tag itself."""
        ids = self._ids
        return [ids.get("I-" + name[2:], index) if name.startswith("B-") else index
                for index, name in enumerate(self.names)]


def label_map(cfg: DataConfig, training_labels: Iterable[str]) -> LabelMap:
    """`data.label_names` when given, else the training split's labels."""
    what = "data.fields.tags" if cfg.format == "tagged_tokens" else "data.label_field"
    if cfg.label_names is not None:
        return LabelMap(tuple(cfg.label_names))
    labels = LabelMap.from_labels(training_labels, what)
    if cfg.format == "tagged_tokens" and all(_is_integer(name) for name in labels.names):
        # Entities are read off the tags' B-/I- names: ids alone would score nonsense.
        raise ConfigError(f"data.label_names: the tags are ids ({', '.join(labels.names[:6])}"
                          f"{', ...' if len(labels.names) > 6 else ''}); give their names in id order "
                          f"(e.g. [O, B-PER, I-PER, ...]) so that entities can be scored")
    return labels


@dataclass(frozen=True)
class LabelledRecord:
    labels: str | list[str]  # the class (labelled_text) or a tag per word (tagged_tokens)
    words: list[str] | None  # tagged_tokens
    text: str | None  # labelled_text


def record_labels(cfg: DataConfig, fields: dict) -> LabelledRecord:
    """The record's label (or tags) and what they label; `BadExample` when it has none that can be
    used. Labels given as ids are named by `data.label_names` when it is set."""
    if cfg.format == "labelled_text":
        text = fields.get(cfg.text_field)
        if not isinstance(text, str):
            raise BadExample("missing_field", f"no string field '{cfg.text_field}'")
        if not text.strip():
            raise BadExample("empty", f"'{cfg.text_field}' is empty")
        return LabelledRecord(_label(cfg, fields.get(cfg.label_field), cfg.label_field), None, text)
    names = cfg.fields
    words, tags = fields.get(names.tokens), fields.get(names.tags)
    for name, value in ((names.tokens, words), (names.tags, tags)):
        if not isinstance(value, list):
            raise BadExample("missing_field", f"no list field '{name}'")
    if not words:
        raise BadExample("empty", f"'{names.tokens}' is an empty list")
    if len(words) != len(tags):
        raise BadExample("length_mismatch", f"{len(words)} {names.tokens}, {len(tags)} {names.tags}")
    if not all(isinstance(word, str) and word for word in words):
        raise BadExample("not_text", f"'{names.tokens}' holds a value that is not a non-empty string")
    return LabelledRecord([_label(cfg, tag, names.tags) for tag in tags], words, None)


def _label(cfg: DataConfig, value, field: str) -> str:
    key = label_key(value)
    if key is None:
        raise BadExample("missing_field" if value is None else "bad_label",
                         f"no field '{field}'" if value is None else f"'{field}' is {value!r}")
    names = cfg.label_names
    if names is not None and key not in names and _is_integer(key):  # an id, given as an int or as "1"
        if not 0 <= int(key) < len(names):
            raise BadExample("unknown_label", f"id {key}, data.label_names has {len(names)}")
        return names[int(key)]
    return key


def _is_integer(name: str) -> bool:
    return re.fullmatch(r"-?[0-9]+", name) is not None


def align_word_labels(word_ids: Sequence[int | None], word_labels: Sequence[int], subword_labels: str,
                      continuation: Sequence[int]) -> list[int]:
    """Each token's label from its word's: -100 on special tokens (no word); a word's first token gets
    the word's label; its later tokens -100 (`first`) or the label's continuation (`all`)."""
    aligned, previous = [], None
    for word in word_ids:
        if word is None:
            aligned.append(IGNORE)
        elif word != previous:
            aligned.append(word_labels[word])
        else:
            aligned.append(continuation[word_labels[word]] if subword_labels == "all" else IGNORE)
        previous = word
    return aligned


class LabelledEncoder:
    """Labelled records -> `Example`s (ids, and labels by the map), in the tokenizer actors."""

    def __init__(self, backend, cfg: DataConfig, labels: LabelMap):
        """`backend`: a `tokenizers.Tokenizer` of this encoder's own (its padding and truncation are set here)."""
        self.backend, self.cfg, self.labels = backend, cfg, labels
        # A tokenizer file may pad and truncate by itself (all-MiniLM-L6-v2's pads to 128): blocks are
        # padded by the reader, and cut at data.seq_len here, keeping the closing special token.
        backend.no_padding()
        backend.enable_truncation(cfg.seq_len)
        self.continuation = labels.continuation_ids()

    def encode(self, records: list[LabelledRecord]) -> list[Example | BadExample]:
        ids = [self._ids(record.labels) for record in records]
        if self.cfg.format == "labelled_text":
            encodings = self.backend.encode_batch([record.text for record in records], add_special_tokens=True)
        else:
            encodings = [self._with_every_word(record.words, encoding) for record, encoding in
                         zip(records, self.backend.encode_batch([record.words for record in records],
                                                                is_pretokenized=True, add_special_tokens=True))]
        return [label_ids if isinstance(label_ids, BadExample) else
                encoding if isinstance(encoding, BadExample) else self._example(label_ids, encoding)
                for label_ids, encoding in zip(ids, encodings)]

    def _with_every_word(self, words: list[str], encoding):
        """A word the normalizer erases (a zero-width space, a soft hyphen) gets no token and its tag
        would go unseen: such words are encoded as the unknown token instead, or without one the
        record is bad. Words cut off by truncation are not vanished ones."""
        present = {word for word in encoding.word_ids if word is not None}
        last = max(present, default=-1) + 1 if encoding.overflowing else len(words)
        vanished = [index for index in range(last) if index not in present]
        if not vanished:
            return encoding
        unknown = getattr(self.backend.model, "unk_token", None)
        if not unknown:
            return BadExample("not_text", f"word {vanished[0]} ({words[vanished[0]]!r}) has no token")
        replaced = [unknown if index in vanished else word for index, word in enumerate(words)]
        return self.backend.encode(replaced, is_pretokenized=True, add_special_tokens=True)

    def _ids(self, labels: str | list[str]) -> int | list[int] | BadExample:
        """A label not in the map (a class the training split never had, met in eval) is a bad record."""
        names = [labels] if isinstance(labels, str) else labels
        found = [self.labels.id_of(name) for name in names]
        unknown = next((name for name, index in zip(names, found) if index is None), None)
        if unknown is not None:
            return BadExample("unknown_label", f"{unknown!r} is not a class of the training split")
        return found[0] if isinstance(labels, str) else found

    def _example(self, label_ids: int | list[int], encoding) -> Example | BadExample:
        if encoding.overflowing and self.cfg.too_long_mode == "skip":
            return BadExample("too_long", f"more than data.seq_len {self.cfg.seq_len} tokens")
        ids = np.asarray(encoding.ids, dtype=np.int32)
        if isinstance(label_ids, int):
            labels = np.full(len(ids), IGNORE, dtype=np.int32)
            labels[0] = label_ids
        else:
            labels = np.asarray(align_word_labels(encoding.word_ids, label_ids, self.cfg.subword_labels,
                                                  self.continuation), dtype=np.int32)
        return Example(ids, labels)
