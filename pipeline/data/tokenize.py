"""Tokenization in a Ray Data actor pool: the tokenizer is loaded once per actor, not per batch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


class TokenizeDocuments:
    """map_batches callable: {doc_key, text, split, bad, detail} -> {doc_key, split, bad, detail, input_ids (+EOS)}.
    Bad records (text "") pass through with empty ids, so the driver can count them in order.

    Actors receive the Rust tokenizer serialized by the driver, exactly as the Hugging Face wrapper
    configured it. Rebuilding it from that string takes ~0.1 s and spares each actor importing
    transformers (seconds of start-up on a small machine); the ids are the wrapper's own.
    """

    def __init__(self, tokenizer_json: str, eos_token_id: int):
        import os

        # Each actor is one process; letting the Rust tokenizer spawn its own threads as well
        # only oversubscribes the cores the pool already uses.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer_json)
        self.eos = eos_token_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        good = [not reason for reason in batch.column("bad").to_pylist()]
        # encode_batch_fast skips computing offsets, which we do not use: ~25% faster.
        encoded = iter(self.backend.encode_batch_fast([t for t, ok in zip(texts, good) if ok], add_special_tokens=False))
        input_ids = pa.array([next(encoded).ids + [self.eos] if ok else [] for ok in good], type=pa.list_(pa.int32()))
        return pa.table({"doc_key": batch.column("doc_key"), "split": batch.column("split"),
                         "bad": batch.column("bad"), "detail": batch.column("detail"), "input_ids": input_ids})


def tokenize(documents, model_ref: str, actors: int, batch_size: int):
    import ray
    import ray.data

    from pipeline.data.read import READ_TASK_CPUS
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(model_ref)
    # Actors hold their CPUs for the whole run: if they took every CPU, no read task could be
    # scheduled and the pipeline would wait forever. Leave one read task's worth free.
    cpus = ray.cluster_resources().get("CPU", 1.0)
    cpus_per_actor = min(1.0, max(0.01, (cpus - READ_TASK_CPUS) / actors))
    return documents.map_batches(
        TokenizeDocuments, fn_constructor_args=(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id),
        batch_size=batch_size, batch_format="pyarrow", num_cpus=cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=actors))


def flat_tokens(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The token values of a tokenized batch and the offsets where each document starts."""
    column = batch.column("input_ids").combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]
