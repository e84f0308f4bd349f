"""`pipeline prepare`: corpus -> packed token cache, keyed by a fingerprint of everything that
changes the blocks (corpus files by size and time, tokenizer, seq_len, split rule, format).

    driver: list the corpus (one listing) -> fingerprint -> cache hit? verify token files, done.
    miss:   plan chunks -> actors: read, tokenize, write one token file per chunk and split
            -> meta.json (every file's token count, size and SHA-256), written last

The token files are the packed cache: block k of a split is tokens [k·L, (k+1)·L) of its files in
chunk order (`pipeline.data.blocks`), so nothing is packed after tokenizing. The driver handles
metadata only; every byte of the corpus and the tokens moves between Ray workers and storage, so a
cluster reads and writes a bucket in parallel. A cache entry is complete when its `meta.json` exists
(written last: object stores have no rename); a build that fails removes what it wrote, and one that
died is cleared by the next build.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.cache import stable_hash
from pipeline.config import Config, ConfigError, DataConfig, RayConfig
from pipeline.data.bad_records import BadRecords, NoUsableDocuments, describe
from pipeline.data.blocks import BlockReader, PackPlan, TokenFile, layout
from pipeline.data.builtin import BUILTIN_PREFIX, builtin_path
from pipeline.data.corpus import SPLITS, CorpusFile, chunk_size, container, list_corpus, plan_chunks
from pipeline.data.examples import compile_chat_template
from pipeline.data.label_scan import training_labels
from pipeline.data.labels import label_map
from pipeline.data.parse import FileProblem, PieceReader
from pipeline.data.tokenize import (
    SAMPLE_CANDIDATES,
    SavedTokenizer,
    backend_tokenizer,
    keep_backend_tokenizer,
    tokenize_chunks,
    tokenizer_location,
    with_chat_template,
    write_cache_file,
)

log = logging.getLogger(__name__)

# Bump when the packed layout or the packing rule changes, so old caches are not reused.
PACK_FORMAT_VERSION = 4
META = "meta.json"


class CorruptCache(ConfigError):
    """A cache entry's token file is missing or does not match meta.json; the message names it."""


@dataclass(frozen=True)
class PreparedData:
    root: str  # the cache entry: a local directory or an object-storage URI
    fingerprint: str
    seq_len: int
    stats: dict  # split -> {documents, tokens, blocks, dropped_tail_tokens}
    cache_hit: bool
    bad_records: dict[str, int]  # reason -> count of skipped records
    bad_examples: dict[str, str]  # reason -> the first such record, "file:line: reason (detail)"
    token_files: dict[str, list[TokenFile]]  # split -> its token files, in stream order
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall seconds, in order
    labelled: bool = False  # an example stream: (id, label) pairs
    plans: dict[str, dict] = field(default_factory=dict)  # split -> its PackPlan file (document packing)
    pad_id: int = 0
    samples: list[dict] = field(default_factory=list)  # held-out {prompt, reference} for sample generations
    label_names: tuple[str, ...] = ()  # the classes in id order (the classification tasks)

    def reader(self, split: str) -> BlockReader:
        """Random access to the split's blocks by sample id (from local disk or object storage)."""
        plan = self.plans.get(split)
        return BlockReader(self.token_files[split], self.seq_len, self.labelled,
                           PackPlan.from_bytes(storage.read_bytes(plan["location"])) if plan else None, self.pad_id)

    def blocks(self, split: str) -> int:
        return self.stats[split]["blocks"]

    def summary(self) -> str:
        lines = [f"data cache {self.root} ({'reused' if self.cache_hit else 'written'}, "
                 f"fingerprint {self.fingerprint})"]
        for split in SPLITS:
            s = self.stats[split]
            packed = (f"{s['filled']:.0%} filled" if "filled" in s
                      else f"dropped tail: {s['dropped_tail_tokens']:,} tokens")
            lines.append(f"  {split:5s}: {s['documents']:,} {'examples' if self.labelled else 'documents'}, "
                         f"{s['tokens']:,} tokens -> {s['blocks']:,} blocks of {self.seq_len} ({packed})")
        if self.bad_records:
            lines.append("  " + describe(self.bad_records, self.bad_examples))
        lines.append("  in " + ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in self.seconds.items()))
        return "\n".join(lines)


def prepare(cfg: Config) -> tuple[str, PreparedData]:
    """The model first (its tokenizer defines the tokens), then the packed data. Needs no tracking
    server; Ray is started only when the cache must be built."""
    model_ref = prepare_model(cfg)
    return model_ref, prepare_data(cfg.data, model_ref, cfg.ray)


def prepare_model(cfg: Config) -> str:
    """The model whose tokenizer defines the tokens, checked against data.seq_len (before Ray starts)."""
    from pipeline.models import materialize_model, max_positions

    model_ref = materialize_model(cfg.model)
    limit = max_positions(model_ref)
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is above the model's maximum of {limit} positions")
    return model_ref


def data_fingerprint(cfg: DataConfig, files: list[CorpusFile], tokenizer_fingerprint: str) -> str:
    return stable_hash({
        "version": PACK_FORMAT_VERSION,
        "files": [f.identity() for f in files],
        "format": cfg.format,
        "text_field": cfg.text_field,
        "tokenizer": tokenizer_fingerprint,
        "seq_len": cfg.seq_len,
        "split": cfg.split.model_dump(mode="json"),
        "bad_records": [cfg.on_bad_record, cfg.max_document_bytes],
        **({"examples": [cfg.file_type, cfg.fields.model_dump(), cfg.chat_template, cfg.prompt_template,
                         cfg.train_on_prompt, cfg.packing_mode, cfg.too_long_mode]} if cfg.has_examples else {}),
        **({"labelled": [cfg.file_type, cfg.fields.model_dump(), cfg.label_field, cfg.label_names, cfg.subword_labels,
                         cfg.too_long_mode]} if cfg.is_labelled else {}),
    })


def prepare_data(cfg: DataConfig, model_ref: str, ray_config: RayConfig | None = None) -> PreparedData:
    """Reuse the packed cache when the fingerprint matches (verifying its token files); otherwise build it."""
    from pipeline.models import hf_dir_fingerprint

    seconds: dict[str, float] = {}
    unreadable = BadRecords(cfg.on_bad_record)
    with timed(seconds, "building the built-in dataset" if cfg.path.startswith(BUILTIN_PREFIX) else "listing"):
        cfg = cfg.model_copy(update={"path": builtin_path(cfg.path, cfg.cache_dir)})
    with timed(seconds, "listing"):
        files = list_corpus(cfg, unreadable)  # unreadable entries are counted (or fail) here, before Ray reads
        if not files:
            raise NoUsableDocuments(f"data.path: no readable file in '{cfg.path}' ({unreadable.summary()})")
        model_key = hf_dir_fingerprint(model_ref)
        fingerprint = data_fingerprint(cfg, files, model_key)
        root = storage.join(cfg.cache_dir, fingerprint)
        meta = _read_meta(root)
    cache_hit = meta is not None
    if cache_hit:
        with timed(seconds, "verifying"):
            verify_token_files(root, [f for split in SPLITS for f in meta["files"][split]] + list(meta["plans"].values()),
                           cfg.verify_checksums)
    else:
        from pipeline.runtime import ensure_ray

        check_first_file(cfg, files[0])
        kept_at = tokenizer_location(cfg.cache_dir, model_key)
        # The tokenizer loads (importing transformers, seconds, unless it was kept) while Ray starts.
        with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
            tokenizer = pool.submit(backend_tokenizer, model_ref, kept_at, not cfg.is_labelled)
            with timed(seconds, "starting Ray"):
                ensure_ray(ray_config or RayConfig(), dashboard=False)  # training starts Ray (with it) before this
            with timed(seconds, "loading the tokenizer"):
                loaded, kept = tokenizer.result()
        meta = _build(cfg, files, model_ref, root, unreadable, seconds, checked_tokenizer(cfg, loaded, model_ref))
        if not kept:  # only after a build that succeeded: a failed one leaves nothing behind
            keep_backend_tokenizer(kept_at, loaded)
    # Unreadable entries are not part of the cached corpus (the fingerprint covers readable files only),
    # so they are counted afresh on every run; records are counted when the cache was built.
    counts, examples = dict(meta["bad_records"]), dict(meta["bad_examples"])
    for reason, count in unreadable.counts.items():
        counts[reason] = counts.get(reason, 0) + count
        examples.setdefault(reason, unreadable.examples[reason])
    token_files = {split: [TokenFile(**f) for f in meta["files"][split]] for split in SPLITS}
    return PreparedData(root=root, fingerprint=fingerprint, seq_len=meta["seq_len"], stats=meta["stats"],
                        cache_hit=cache_hit, bad_records=counts, bad_examples=examples, token_files=token_files,
                        seconds=seconds, labelled=meta["labelled"], plans=meta["plans"], pad_id=meta["pad_id"],
                        samples=meta["samples"], label_names=tuple(meta.get("label_names") or ()))


def checked_tokenizer(cfg: DataConfig, loaded: SavedTokenizer, model_ref: str) -> SavedTokenizer:
    """The tokenizer the actors use; a chat format needs a chat template that compiles."""
    tokenizer = with_chat_template(loaded, cfg.chat_template)
    if cfg.is_labelled and tokenizer.text.pad_token_id is None and tokenizer.text.eos_token_id is None:
        raise ConfigError(f"model.path: the tokenizer of '{model_ref}' has neither a pad nor an EOS token to pad blocks with")
    if cfg.format == "chat":
        if not tokenizer.text.chat_template:
            raise ConfigError(f"data.chat_template: the tokenizer of '{model_ref}' has no chat template; set one")
        try:
            compile_chat_template(tokenizer.text.chat_template)
        except Exception as error:  # noqa: BLE001 - jinja's syntax errors, named as the config's
            raise ConfigError(f"data.chat_template: the template does not compile: {error}") from None
    return tokenizer


@contextlib.contextmanager
def timed(seconds: dict[str, float], phase: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - started


def _read_meta(root: str) -> dict | None:
    location = storage.join(root, META)
    return json.loads(storage.read_text(location)) if storage.is_file(location) else None


def check_first_file(cfg: DataConfig, first: CorpusFile) -> None:
    """A text column that is missing or not text is named before Ray starts (one footer read); the
    tasks check every other file and return the same message."""
    if container(cfg, first.name) in ("parquet", "hf"):
        try:
            next(iter(PieceReader(cfg).records(first.location, first.name, first.size, 0, first.size)), None)
        except FileProblem as problem:
            raise ConfigError(str(problem)) from None


def _build(cfg: DataConfig, files: list[CorpusFile], model_ref: str, root: str, unreadable: BadRecords,
           seconds: dict[str, float], tokenizer: SavedTokenizer) -> dict:
    storage.delete(root)  # what a build that died before writing meta.json left behind
    try:
        chunks = [[{"location": p.file.location, "name": p.file.name, "size": p.file.size, "start": p.start,
                    "end": p.end} for p in chunk]
                  for chunk in plan_chunks(files, cfg, chunk_size(files, cfg.chunk_bytes, cfg.tokenize_actors))]
        labels = None
        if cfg.is_labelled:
            with timed(seconds, "counting the training labels"):
                labels = label_map(cfg, training_labels(chunks, cfg) if cfg.label_names is None else ())
        with timed(seconds, "reading + tokenizing"):
            results = tokenize_chunks([{"chunk": i, "pieces": pieces} for i, pieces in enumerate(chunks)], cfg,
                                      tokenizer, root, labels)
        bad = _bad_records(cfg, results, chunks)
        documents = {split: sum(r["documents"][split] for r in results) for split in SPLITS}
        if not any(documents.values()):
            everything = describe({**bad.counts, **unreadable.counts}, {**bad.examples, **unreadable.examples})
            raise NoUsableDocuments(f"data.path: no usable document in the {len(files)} readable files of "
                                    f"'{cfg.path}' ({everything or 'the corpus is empty'})")
        token_files = {split: [r["files"][split] for r in results if split in r["files"]] for split in SPLITS}
        stats, plans = {}, {}
        for split in SPLITS:
            blocks = layout([TokenFile(**f) for f in token_files[split]], cfg.seq_len)
            stats[split] = {"documents": documents[split], "tokens": blocks.tokens, "blocks": blocks.blocks,
                            "dropped_tail_tokens": blocks.dropped_tail_tokens}
            if cfg.reads_records and cfg.packing_mode != "naive":
                plans[split], stats[split] = _write_plan(cfg, root, split, results, stats[split])
        meta = {"version": PACK_FORMAT_VERSION, "seq_len": cfg.seq_len, "stats": stats, "files": token_files,
                "labelled": cfg.reads_records, "plans": plans, "pad_id": _pad_id(cfg, tokenizer),
                "label_names": list(labels.names) if labels else None,
                "samples": [s for r in results for s in r["samples"]][:SAMPLE_CANDIDATES],
                "model_ref": model_ref, "bad_records": bad.counts, "bad_examples": bad.examples,
                "corpus": [f.location for f in files], "data_config": cfg.model_dump(mode="json")}
        storage.write_text(storage.join(root, META), json.dumps(meta, indent=1))  # the commit: last
        return meta
    except BaseException:
        storage.delete(root)
        raise


def _pad_id(cfg: DataConfig, tokenizer: SavedTokenizer) -> int:
    """Blocks of examples are padded with EOS; an encoder's (labelled formats) with its pad token."""
    text = tokenizer.text
    return text.pad_token_id if cfg.is_labelled and text.pad_token_id is not None else text.eos_token_id


def _write_plan(cfg: DataConfig, root: str, split: str, results: list[dict], stats: dict) -> tuple[dict, dict]:
    """Pack a split's examples into blocks by document (`PackPlan`): its file entry and its stats."""
    import numpy as np

    lengths = np.asarray([n for r in results for n in r["lengths"][split]], dtype=np.int64)
    plan = PackPlan.next_fit(lengths, cfg.seq_len, one_per_block=cfg.packing_mode == "none")
    written = write_cache_file(storage.join(root, split, "plan.npz"), plan.to_bytes())
    filled = int(lengths.sum()) / max(1, plan.blocks * cfg.seq_len)
    return written, {**stats, "blocks": plan.blocks, "dropped_tail_tokens": 0, "filled": round(filled, 4)}


def _bad_records(cfg: DataConfig, results: list[dict], chunks: list[list[dict]]) -> BadRecords:
    """The chunks' bad records in corpus order: counted, or under `fail` the first one raised with
    its file and line (the line from the lines each earlier piece of the same file owned)."""
    for result in results:
        if result["problem"]:
            raise ConfigError(result["problem"])
    lines_before: dict[tuple[int, int], int] = {}  # (chunk, piece) -> lines of its file in earlier pieces
    seen: dict[str, int] = {}
    for result, pieces in zip(results, chunks):
        for index, piece in enumerate(pieces):
            lines_before[(result["chunk"], index)] = seen.get(piece["location"], 0)
            if index < len(result["lines"]):  # a chunk stopped by `fail` knows only its earlier pieces
                seen[piece["location"]] = lines_before[(result["chunk"], index)] + result["lines"][index]

    def where(chunk: int, piece_index: int, record_index: int, reason: str) -> str:
        piece = chunks[chunk][piece_index]
        kind = container(cfg, piece["name"])
        if reason == "unreadable_file" or kind == "text":
            return piece["location"] if reason == "unreadable_file" else piece["name"]
        if kind == "jsonl":
            return f"{piece['name']}:{lines_before.get((chunk, piece_index), 0) + record_index}"
        return f"{piece['name']}#{record_index}"

    bad = BadRecords(cfg.on_bad_record)
    for result in results:
        if result["first_bad"] and cfg.on_bad_record == "fail":
            reason, piece_index, record_index, detail = result["first_bad"]
            bad.add(reason, where(result["chunk"], piece_index, record_index, reason), detail)  # raises
        for reason, count in result["bad"].items():
            piece_index, record_index, detail = result["examples"][reason]
            bad.merge(reason, count, where(result["chunk"], piece_index, record_index, reason), detail)
    return bad


def verify_token_files(root: str, files: list[dict], checksums: bool) -> None:
    """Every token file meta.json lists is there with its size (one listing) and, unless turned off,
    its SHA-256 (read in parallel): a damaged cache is named here, not deep inside a training worker."""
    present = {f.location: f.size for f in storage.list_files(root)}
    for file in files:
        size = present.get(file["location"])
        if size is None:
            raise CorruptCache(f"data.cache_dir: token file {file['location']} is missing; delete {root} to rebuild it")
        if size != file["bytes"]:
            raise CorruptCache(f"data.cache_dir: token file {file['location']} has {size} bytes, meta.json says "
                               f"{file['bytes']}; delete {root} to rebuild it")
    if not checksums:
        return
    with ThreadPoolExecutor(storage.TRANSFER_THREADS) as pool:
        digests = list(pool.map(lambda f: storage.sha256(f["location"]), files))
    for file, digest in zip(files, digests):
        if digest != file["sha256"]:
            raise CorruptCache(f"data.cache_dir: token file {file['location']} does not match its SHA-256 in "
                               f"meta.json (corrupt); delete {root} to rebuild it")
