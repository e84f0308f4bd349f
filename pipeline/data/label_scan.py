"""The training split's labels, counted on the cluster before tokenizing: the label map (sorted
classes) must be known to every tokenizer actor, and no one chunk sees all of them.

One light Ray task per chunk reads its records (as the tokenizer will), keeps the training ones'
labels and returns their counts; bad records are left for the tokenizing pass to count and report,
and a file that cannot be read as the config says (`FileProblem`) is the same one-line error here.
A second read of the corpus: labelled corpora are small next to pre-training text.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

from pipeline import storage
from pipeline.config import ConfigError, DataConfig, StorageConfig
from pipeline.data.corpus import LIGHT_TASK_CPUS, SplitRule
from pipeline.data.examples import BadExample
from pipeline.data.labels import record_labels
from pipeline.data.parse import FileProblem, PieceReader


def count_training_labels(pieces: list[dict], cfg: DataConfig, settings: StorageConfig) -> dict[str, int] | str:
    """Label -> how often the training records of these pieces hold it; or what makes a file unreadable."""
    storage.configure(settings)
    split_rule, reader, counts = SplitRule(cfg.split), PieceReader(cfg), Counter()
    try:
        for piece in pieces:
            counts.update(_training_labels(piece, cfg, split_rule, reader))
    except FileProblem as problem:
        return str(problem)
    return dict(counts)


def _training_labels(piece: dict, cfg: DataConfig, split_rule: SplitRule, reader: PieceReader) -> Iterator[str]:
    """Every label of the piece's good training records (a tag per word for tagged tokens)."""
    file_name = piece["name"].rsplit("/", 1)[-1]
    for record in reader.records(**piece):
        if record.bad or record.fields is None:
            continue
        try:
            labelled = record_labels(cfg, record.fields)
        except BadExample:
            continue
        text = record.text or (json.dumps(record.fields, sort_keys=True) if split_rule.reads_text else "")
        if split_rule(file_name, text) == "train":
            yield from [labelled.labels] if isinstance(labelled.labels, str) else labelled.labels


def training_labels(chunks: list[list[dict]], cfg: DataConfig) -> dict[str, int]:
    """Label -> count over the whole training split, one task per chunk."""
    import ray

    task = ray.remote(num_cpus=LIGHT_TASK_CPUS)(count_training_labels)
    totals = Counter()
    for counts in ray.get([task.remote(pieces, cfg, storage.settings()) for pieces in chunks]):
        if isinstance(counts, str):
            raise ConfigError(counts)
        totals.update(counts)
    return dict(totals)
