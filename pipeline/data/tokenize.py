"""In a Ray Data actor pool: read a chunk, tokenize it, write its token streams.

Each call takes one chunk (a list of byte ranges of corpus files), streams its records, tokenizes the
good ones in batches, appends EOS to each document, and writes one flat little-endian int32 file per
split (`<build>/<split>/chunk-NNNNNN.bin`) straight to the cache location: these files are the packed
cache (`pipeline.data.blocks`). An example format writes (id, label) pairs instead
(`pipeline.data.examples`). It returns only metadata: per split the token and document counts, the
file's size and SHA-256 and each example's length (from which the driver packs blocks), bad-record
counts with the first example of each, and the lines each piece owned (so the driver can turn a
piece-local line number into the file's line).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa

from pipeline import console, storage
from pipeline.config import DataConfig, StorageConfig
from pipeline.data.corpus import BLOCKS_PER_WORKER, LIGHT_TASK_CPUS, SPLITS, SplitRule
from pipeline.data.examples import BadExample, ExampleEncoder, Renderer, TokenizerText
from pipeline.data.labels import LabelledEncoder, LabelMap, record_labels
from pipeline.data.parse import FileProblem, PieceReader

SAVED_TOKENIZER_VERSION = 3  # a kept tokenizer of another version is loaded afresh
SAMPLE_CANDIDATES = 8  # held-out (prompt, reference) pairs a chunk keeps for sample generations


def token_file(build: str, split: str, chunk: int) -> str:
    return storage.join(build, split, f"chunk-{chunk:06d}.bin")


def write_cache_file(location: str, data: bytes) -> dict:
    """Write one file of a cache entry; its entry in meta.json (what `verify_token_files` checks)."""
    storage.write_bytes(location, data)
    return {"location": location, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class TokenizeChunks:
    """map_batches callable over chunk specs (batch size 1): {"spec": json} -> {"result": json}.

    Actors receive the Rust tokenizer serialized by the driver, exactly as the Hugging Face wrapper
    configured it. Rebuilding it from that string takes ~0.1 s and spares each actor importing
    transformers (seconds of start-up on a small machine); the ids are the wrapper's own.
    """

    def __init__(self, tokenizer: SavedTokenizer, cfg: DataConfig, settings: StorageConfig, build: str,
                 labels: LabelMap | None = None):
        # Each actor is one process; letting the Rust tokenizer spawn its own threads as well
        # only oversubscribes the cores the pool already uses.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer

        storage.configure(settings)
        self.backend = Tokenizer.from_str(tokenizer.backend)
        self.eos = tokenizer.text.eos_token_id
        self.cfg = cfg
        self.build = build
        self.split_rule = SplitRule(cfg.split)
        self.renderer = Renderer(cfg, tokenizer.text) if cfg.has_examples else None
        if cfg.is_labelled:
            self.encoder = LabelledEncoder(self.backend, cfg, labels)
        else:
            self.encoder = ExampleEncoder(self.backend, cfg, tokenizer.text) if cfg.has_examples else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [json.dumps(self.process(json.loads(spec))) for spec in batch.column("spec").to_pylist()]
        return pa.table({"result": results})

    def process(self, spec: dict) -> dict:
        result = {"chunk": spec["chunk"], "tokens": dict.fromkeys(SPLITS, 0), "documents": dict.fromkeys(SPLITS, 0),
                  "files": {}, "bad": {}, "examples": {}, "first_bad": None, "lines": [], "problem": None,
                  "lengths": {split: [] for split in SPLITS}, "samples": []}
        streams: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        pending: dict[str, list] = {split: [] for split in SPLITS}
        reader = PieceReader(self.cfg)
        try:
            for piece_index, piece in enumerate(spec["pieces"]):
                if not self._read_piece(reader, piece_index, piece, pending, streams, result):
                    return result  # stopped by a bad record under `fail`: the driver names it
                result["lines"].append(reader.lines)
            for split in SPLITS:
                if pending[split] and not self._flush(split, pending, streams, result):
                    return result
        except FileProblem as problem:
            result["problem"] = str(problem)
            return result
        for split in SPLITS:
            self._write(split, streams[split], result)
        return result

    def _read_piece(self, reader: PieceReader, piece_index: int, piece: dict, pending: dict, streams: dict,
                    result: dict) -> bool:
        """Queue a piece's good records by split, tokenizing full batches; False at a bad record
        under `fail` (nothing more of the chunk is needed)."""
        file_name = piece["name"].rsplit("/", 1)[-1]
        for record in reader.records(**piece):
            item = self._item(record)
            if isinstance(item, BadExample):
                self._count_bad(result, piece_index, record.index, item.reason, item.detail)
                if self.cfg.on_bad_record == "fail":
                    return False
                continue
            text = record.text or (json.dumps(record.fields, sort_keys=True) if self.split_rule.reads_text else "")
            split = self.split_rule(file_name, text)
            pending[split].append((piece_index, record.index, item))
            if len(pending[split]) >= self.cfg.tokenize_batch_size and not self._flush(split, pending, streams, result):
                return False
        return True

    def _item(self, record):
        """A good record's text or rendered example, or a `BadExample` saying why it is bad."""
        if record.bad:
            return BadExample(record.bad, record.detail)
        if record.fields is None:
            return record.text
        try:
            return record_labels(self.cfg, record.fields) if self.cfg.is_labelled else self.renderer.render(record.fields)
        except BadExample as bad:
            return bad

    def _flush(self, split: str, pending: dict, streams: dict, result: dict) -> bool:
        """Tokenize a split's pending batch into its stream; False when a bad example stops the chunk."""
        batch, pending[split] = pending[split], []
        if self.encoder is None:
            streams[split].append(self._encode([text for _, _, text in batch]))
            result["documents"][split] += len(batch)
            return True
        for (piece_index, index, rendered), example in zip(batch, self.encoder.encode([r for _, _, r in batch])):
            if isinstance(example, BadExample):
                self._count_bad(result, piece_index, index, example.reason, example.detail)
                if self.cfg.on_bad_record == "fail":
                    return False
                continue
            streams[split].append(np.stack([example.input_ids, example.labels], axis=1).reshape(-1))
            result["lengths"][split].append(len(example.input_ids))
            result["documents"][split] += 1
            if split == "eval" and self.renderer is not None and len(result["samples"]) < SAMPLE_CANDIDATES:
                result["samples"].append({"prompt": rendered.prompt, "reference": rendered.reference})
        return True

    def _write(self, split: str, stream: list[np.ndarray], result: dict) -> None:
        values = np.concatenate(stream) if stream else np.zeros(0, np.int32)
        tokens = len(values) // (2 if self.encoder else 1)  # an example stream holds (id, label) pairs
        result["tokens"][split] = tokens
        if tokens:
            written = write_cache_file(token_file(self.build, split, result["chunk"]), values.astype("<i4").tobytes())
            result["files"][split] = {**written, "tokens": tokens}

    def _encode(self, texts: list[str]) -> np.ndarray:
        # encode_batch_fast skips computing offsets, which we do not use: ~25% faster.
        encoded = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return np.concatenate([np.append(np.asarray(e.ids, dtype=np.int32), np.int32(self.eos)) for e in encoded])

    @staticmethod
    def _count_bad(result: dict, piece_index: int, index: int, reason: str, detail: str) -> None:
        result["bad"][reason] = result["bad"].get(reason, 0) + 1
        example = [piece_index, index, detail]
        result["examples"].setdefault(reason, example)
        if result["first_bad"] is None:
            result["first_bad"] = [reason, *example]


def tokenizer_location(cache_dir: str, tokenizer_key: str) -> str:
    """Where a serialized tokenizer is kept: the Hugging Face wrapper (and importing transformers,
    seconds on a small machine) is then needed once per tokenizer, not once per corpus."""
    return storage.join(cache_dir, "tokenizers", f"{tokenizer_key}.json")


@dataclass(frozen=True)
class SavedTokenizer:
    backend: str  # the Rust tokenizer serialized as the Hugging Face wrapper configures it
    text: TokenizerText


def backend_tokenizer(model_ref: str, location: str, needs_eos: bool = True) -> tuple[SavedTokenizer, bool]:
    """(the model's tokenizer as the actors use it, whether it came from `location`)."""
    if storage.is_file(location):
        saved = json.loads(storage.read_text(location))
        if saved.get("version") == SAVED_TOKENIZER_VERSION:
            return SavedTokenizer(saved["backend"], TokenizerText(**saved["text"])), True
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(model_ref, needs_eos)  # raises, naming the model, when it needs EOS and has none
    bos = tokenizer.bos_token_id
    text = TokenizerText(chat_template=getattr(tokenizer, "chat_template", None), bos_token=tokenizer.bos_token,
                         bos_token_id=bos, adds_bos=bos is not None and tokenizer("a")["input_ids"][:1] == [bos],
                         eos_token=tokenizer.eos_token, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return SavedTokenizer(tokenizer.backend_tokenizer.to_str(), text), False


def with_chat_template(tokenizer: SavedTokenizer, chat_template: str | None) -> SavedTokenizer:
    """data.chat_template, when set, replaces the tokenizer's own."""
    return replace(tokenizer, text=replace(tokenizer.text, chat_template=chat_template)) if chat_template else tokenizer


def keep_backend_tokenizer(location: str, tokenizer: SavedTokenizer) -> None:
    storage.write_text(location, json.dumps({"version": SAVED_TOKENIZER_VERSION, "backend": tokenizer.backend,
                                             "text": asdict(tokenizer.text)}))


def tokenize_chunks(chunks: list[dict], cfg: DataConfig, tokenizer: SavedTokenizer, build: str,
                    labels: LabelMap | None = None) -> list[dict]:
    """Tokenize every chunk on the cluster; the per-chunk metadata, in chunk order."""
    import ray
    import ray.data

    actors = max(1, min(cfg.tokenize_actors, len(chunks)))
    # Actors hold their CPUs for the whole run: if they took every CPU, nothing else (the stage's
    # input task) could be scheduled and the pipeline would wait forever.
    cpus = ray.cluster_resources().get("CPU", 1.0)
    cpus_per_actor = min(1.0, max(0.01, (cpus - LIGHT_TASK_CPUS) / actors))
    # A few blocks per actor: enough to balance equal-sized chunks, few enough that scheduling a block
    # (milliseconds each) stays small next to tokenizing it, even for tens of thousands of chunks.
    specs = ray.data.from_items([{"spec": json.dumps(chunk)} for chunk in chunks],
                                override_num_blocks=min(len(chunks), BLOCKS_PER_WORKER * actors))
    tokenized = specs.map_batches(
        TokenizeChunks, batch_size=1, batch_format="pyarrow", num_cpus=cpus_per_actor,
        fn_constructor_args=(tokenizer, cfg, storage.settings(), build, labels),
        compute=ray.data.ActorPoolStrategy(size=actors))
    # Streamed rather than taken at once, so the console can count the corpus bytes as chunks finish.
    sizes = [sum(piece["end"] - piece["start"] for piece in chunk["pieces"]) for chunk in chunks]
    total, results, read, documents = sum(sizes), [], 0, 0
    for row in tokenized.iter_rows():
        result = json.loads(row["result"])
        results.append(result)
        read += sizes[result["chunk"]]
        documents += sum(result["documents"].values())
        console.progress("bytes", read, total, [f"{len(results)}/{len(chunks)} chunks", f"{documents:,} documents"])
    return sorted(results, key=lambda r: r["chunk"])
