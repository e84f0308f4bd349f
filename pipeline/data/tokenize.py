"""In a Ray Data actor pool: read a chunk, tokenize it, write its token streams.

Each call takes one chunk (a list of byte ranges of corpus files), streams its records, tokenizes the
good ones in batches, appends EOS to each document, and writes one flat little-endian int32 file per
split (`<build>/<split>/chunk-NNNNNN.bin`) straight to the cache location: these files are the packed
cache (`pipeline.data.blocks`). It returns only metadata: per split the token and document counts and
the file's size and SHA-256, bad-record counts with the first example of each, and the lines each
piece owned (so the driver can turn a piece-local line number into the file's line).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import DataConfig, StorageConfig
from pipeline.data.corpus import BLOCKS_PER_WORKER, LIGHT_TASK_CPUS, SPLITS, SplitRule
from pipeline.data.parse import FileProblem, PieceReader


def token_file(build: str, split: str, chunk: int) -> str:
    return storage.join(build, split, f"chunk-{chunk:06d}.bin")


class TokenizeChunks:
    """map_batches callable over chunk specs (batch size 1): {"spec": json} -> {"result": json}.

    Actors receive the Rust tokenizer serialized by the driver, exactly as the Hugging Face wrapper
    configured it. Rebuilding it from that string takes ~0.1 s and spares each actor importing
    transformers (seconds of start-up on a small machine); the ids are the wrapper's own.
    """

    def __init__(self, tokenizer_json: str, eos_token_id: int, cfg: DataConfig, settings: StorageConfig,
                 build: str):
        # Each actor is one process; letting the Rust tokenizer spawn its own threads as well
        # only oversubscribes the cores the pool already uses.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer

        storage.configure(settings)
        self.backend = Tokenizer.from_str(tokenizer_json)
        self.eos = eos_token_id
        self.cfg = cfg
        self.build = build
        self.split_rule = SplitRule(cfg.split)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [json.dumps(self.process(json.loads(spec))) for spec in batch.column("spec").to_pylist()]
        return pa.table({"result": results})

    def process(self, spec: dict) -> dict:
        result = {"chunk": spec["chunk"], "tokens": dict.fromkeys(SPLITS, 0), "documents": dict.fromkeys(SPLITS, 0),
                  "files": {}, "bad": {}, "examples": {}, "first_bad": None, "lines": [], "problem": None}
        streams: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        pending: dict[str, list[str]] = {split: [] for split in SPLITS}
        reader = PieceReader(self.cfg)
        try:
            for piece_index, piece in enumerate(spec["pieces"]):
                for record in reader.records(**piece):
                    if record.bad:
                        self._count_bad(result, piece_index, record)
                        if self.cfg.on_bad_record == "fail":
                            return result  # the driver names it; nothing of this chunk is needed
                        continue
                    split = self.split_rule(piece["name"].rsplit("/", 1)[-1], record.text)
                    pending[split].append(record.text)
                    result["documents"][split] += 1
                    if len(pending[split]) >= self.cfg.tokenize_batch_size:
                        streams[split].append(self._encode(pending[split]))
                        pending[split] = []
                result["lines"].append(reader.lines)
        except FileProblem as problem:
            result["problem"] = str(problem)
            return result
        for split in SPLITS:
            if pending[split]:
                streams[split].append(self._encode(pending[split]))
            tokens = np.concatenate(streams[split]) if streams[split] else np.zeros(0, np.int32)
            result["tokens"][split] = len(tokens)
            if len(tokens):
                data = tokens.astype("<i4").tobytes()
                location = token_file(self.build, split, spec["chunk"])
                storage.write_bytes(location, data)
                result["files"][split] = {"location": location, "tokens": len(tokens), "bytes": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()}
        return result

    def _encode(self, texts: list[str]) -> np.ndarray:
        # encode_batch_fast skips computing offsets, which we do not use: ~25% faster.
        encoded = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return np.concatenate([np.append(np.asarray(e.ids, dtype=np.int32), np.int32(self.eos)) for e in encoded])

    @staticmethod
    def _count_bad(result: dict, piece_index: int, record) -> None:
        result["bad"][record.bad] = result["bad"].get(record.bad, 0) + 1
        example = [piece_index, record.index, record.detail]
        result["examples"].setdefault(record.bad, example)
        if result["first_bad"] is None:
            result["first_bad"] = [record.bad, *example]


def tokenizer_location(cache_dir: str, tokenizer_key: str) -> str:
    """Where a serialized tokenizer is kept: the Hugging Face wrapper (and importing transformers,
    seconds on a small machine) is then needed once per tokenizer, not once per corpus."""
    return storage.join(cache_dir, "tokenizers", f"{tokenizer_key}.json")


def backend_tokenizer(model_ref: str, location: str) -> tuple[str, int, bool]:
    """(the Rust tokenizer serialized as the Hugging Face wrapper configures it, its EOS id, whether
    it came from `location`)."""
    if storage.is_file(location):
        saved = json.loads(storage.read_text(location))
        return saved["backend"], saved["eos_token_id"], True
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(model_ref)  # raises, naming the model, when it has no EOS token
    return tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id, False


def keep_backend_tokenizer(location: str, backend: str, eos_token_id: int) -> None:
    storage.write_text(location, json.dumps({"backend": backend, "eos_token_id": eos_token_id}))


def tokenize_chunks(chunks: list[dict], cfg: DataConfig, tokenizer: tuple[str, int], build: str) -> list[dict]:
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
    results = specs.map_batches(
        TokenizeChunks, batch_size=1, batch_format="pyarrow", num_cpus=cpus_per_actor,
        fn_constructor_args=(*tokenizer, cfg, storage.settings(), build),
        compute=ray.data.ActorPoolStrategy(size=actors)).take_all()
    return sorted((json.loads(row["result"]) for row in results), key=lambda r: r["chunk"])
