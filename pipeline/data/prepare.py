"""`pipeline prepare`: corpus -> packed parquet cache, keyed by a fingerprint of everything that
changes the blocks (corpus files, tokenizer, seq_len, split rule, format)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.cache import cached_dir, file_identity, stable_hash
from pipeline.config import DataConfig
from pipeline.data.bad_records import BadRecords, NoUsableDocuments, describe
from pipeline.data.pack import BlockPacker
from pipeline.data.read import SPLITS, corpus_files, read_documents
from pipeline.data.tokenize import flat_tokens, tokenize

log = logging.getLogger(__name__)

# Bump when the packed layout or the packing rule changes, so old caches are not reused.
PACK_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PreparedData:
    root: Path
    fingerprint: str
    seq_len: int
    stats: dict  # split -> {documents, tokens, blocks, dropped_tail_tokens, files}
    cache_hit: bool
    bad_records: dict[str, int]  # reason -> count of skipped records
    bad_examples: dict[str, str]  # reason -> the first such record, "file:line: reason (detail)"

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def blocks(self, split: str) -> int:
        return self.stats[split]["blocks"]

    def summary(self) -> str:
        lines = [f"data cache {self.root} ({'reused' if self.cache_hit else 'written'}, "
                 f"fingerprint {self.fingerprint})"]
        for split in SPLITS:
            s = self.stats[split]
            lines.append(f"  {split:5s}: {s['documents']:,} documents, {s['tokens']:,} tokens -> "
                         f"{s['blocks']:,} blocks of {self.seq_len} (dropped tail: {s['dropped_tail_tokens']:,} tokens)")
        if self.bad_records:
            lines.append("  " + describe(self.bad_records, self.bad_examples))
        return "\n".join(lines)


def data_fingerprint(cfg: DataConfig, files: list[Path], tokenizer_fingerprint: str) -> str:
    return stable_hash({
        "version": PACK_FORMAT_VERSION,
        "files": [file_identity(p) for p in files],
        "format": cfg.format,
        "text_field": cfg.text_field,
        "tokenizer": tokenizer_fingerprint,
        "seq_len": cfg.seq_len,
        "split": cfg.split.model_dump(mode="json"),
        "bad_records": [cfg.on_bad_record, cfg.max_document_bytes],
    })


def prepare_data(cfg: DataConfig, model_ref: str) -> PreparedData:
    """Reuse the packed cache when the fingerprint matches; otherwise build it with Ray Data.
    Ray must already be initialised (see pipeline.runtime)."""
    from pipeline.models import hf_dir_fingerprint

    bad = BadRecords(cfg.on_bad_record)
    files = corpus_files(cfg, bad)  # unreadable files are counted (or fail) here, before Ray reads
    if not files:
        raise NoUsableDocuments(f"data.path: no readable file in '{cfg.path}' ({bad.summary()})")
    fingerprint = data_fingerprint(cfg, files, hf_dir_fingerprint(model_ref))
    existed = (Path(cfg.cache_dir).expanduser().resolve() / fingerprint / "meta.json").is_file()
    root = cached_dir(cfg.cache_dir, fingerprint, lambda out: _build(cfg, files, model_ref, out, bad))
    meta = json.loads((root / "meta.json").read_text())
    # Unreadable files are not part of the cached corpus (the fingerprint covers readable files only),
    # so they are counted afresh on every run; records are counted when the cache was built.
    counts, examples = dict(meta.get("bad_records", {})), dict(meta.get("bad_examples", {}))
    for reason, count in bad.counts.items():
        counts[reason] = counts.get(reason, 0) + count
        examples.setdefault(reason, bad.examples[reason])
    return PreparedData(root=root, fingerprint=fingerprint, seq_len=meta["seq_len"], stats=meta["stats"],
                        cache_hit=existed, bad_records=counts, bad_examples=examples)


def _build(cfg: DataConfig, files: list[Path], model_ref: str, out: Path, unreadable: BadRecords) -> None:
    import ray.data

    # Blocks get their sample_id from their position in the stream, so Ray Data must hand the
    # tokenized documents back in input order however many actors tokenized them.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    documents = read_documents(cfg, files)
    tokenized = tokenize(documents, model_ref, cfg.tokenize_actors, cfg.tokenize_batch_size)
    packers = {split: BlockPacker(out / split, cfg.seq_len) for split in SPLITS}
    bad = BadRecords(cfg.on_bad_record)  # in stream order: under `fail`, the first bad record stops it
    for batch in tokenized.iter_batches(batch_format="pyarrow", batch_size=None):
        values, offsets = flat_tokens(batch)
        columns = (batch.column(name).to_pylist() for name in ("split", "bad", "doc_key", "detail"))
        for index, (split, reason, key, detail) in enumerate(zip(*columns)):
            if reason:
                bad.add(reason, key, detail)
            else:
                packers[split].add_document(values[offsets[index]:offsets[index + 1]])
    stats = {split: packer.close() for split, packer in packers.items()}
    if not any(s["documents"] for s in stats.values()):
        everything = describe({**bad.counts, **unreadable.counts}, {**bad.examples, **unreadable.examples})
        raise NoUsableDocuments(f"data.path: no usable document in the {len(files)} readable files of "
                                f"'{cfg.path}' ({everything or 'the corpus is empty'})")
    meta = {"seq_len": cfg.seq_len, "stats": stats, "model_ref": model_ref, "bad_records": bad.counts,
            "bad_examples": bad.examples, "corpus": [str(p) for p in files], "data_config": cfg.model_dump(mode="json")}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
