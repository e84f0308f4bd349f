"""Stage 2: cut each split's token stream into seq_len blocks and write them as parquet shards.

The stream of a split is its chunks' token files in chunk order, so a block's `sample_id` (its
index in that stream) follows from the chunks' token counts alone: the driver computes prefix sums
and hands each packing task a block range plus the byte ranges it must read. Every token is kept
in order; only the final partial block of a split is dropped. Each shard's rows, size and SHA-256
are returned for `meta.json`, which is what lets a reader detect a corrupt or missing shard.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import StorageConfig

TOKEN_BYTES = 4  # int32


@dataclass(frozen=True)
class ShardPlan:
    split: str
    location: str  # where the shard is written
    first_block: int  # its first sample_id
    blocks: int
    reads: list[tuple[str, int, int]]  # (token file, byte offset, byte count), in stream order


@dataclass(frozen=True)
class SplitLayout:
    tokens: int
    blocks: int
    dropped_tail_tokens: int
    shards: list[ShardPlan]


def plan_split(split: str, token_files: list[tuple[str, int]], seq_len: int, blocks_per_shard: int,
               shard_location) -> SplitLayout:
    """Shards for one split. `token_files` are (location, token count) in stream order;
    `shard_location(index)` names shard `index`."""
    starts = np.concatenate([[0], np.cumsum([count for _, count in token_files])]).astype(np.int64)
    total = int(starts[-1])
    blocks = total // seq_len
    shards = []
    for index, first in enumerate(range(0, blocks, blocks_per_shard)):
        count = min(blocks_per_shard, blocks - first)
        begin, end = first * seq_len, (first + count) * seq_len
        reads = []
        for (location, _), file_start, file_end in zip(token_files, starts[:-1], starts[1:]):
            lo, hi = max(begin, int(file_start)), min(end, int(file_end))
            if lo < hi:
                reads.append((location, (lo - int(file_start)) * TOKEN_BYTES, (hi - lo) * TOKEN_BYTES))
        shards.append(ShardPlan(split, shard_location(index), first, count, reads))
    return SplitLayout(total, blocks, total - blocks * seq_len, shards)


def write_shard(plan: ShardPlan, seq_len: int) -> dict:
    """Read the plan's token ranges, write its blocks as {sample_id, input_ids}; its meta entry."""
    parts = []
    for location, offset, size in plan.reads:
        fs, path = storage.filesystem(location)
        with fs.open_input_file(path) as handle:
            parts.append(np.frombuffer(handle.read_at(size, offset), dtype="<i4"))
    blocks = np.concatenate(parts).astype(np.int32).reshape(plan.blocks, seq_len)
    sample_ids = np.arange(plan.first_block, plan.first_block + plan.blocks, dtype=np.int64)
    table = pa.table({"sample_id": sample_ids,
                      "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1)), seq_len)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=1024)
    data = buffer.getvalue()
    storage.write_bytes(plan.location, data)
    return {"split": plan.split, "location": plan.location, "first_block": plan.first_block, "rows": plan.blocks,
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_shards(plans: list[ShardPlan], seq_len: int) -> list[dict]:
    """Stage 2 on the cluster: one Ray Data row per shard, written in parallel; their meta entries."""
    import ray.data

    from pipeline.data.corpus import BLOCKS_PER_WORKER, LIGHT_TASK_CPUS

    if not plans:
        return []
    settings = storage.settings()
    # Plans travel as JSON: Arrow cannot hold their mixed-type read tuples as columns.
    import ray

    workers = max(1, int(ray.cluster_resources().get("CPU", 1) / LIGHT_TASK_CPUS))
    rows = ray.data.from_items([{"plan": json.dumps(asdict(plan))} for plan in plans],
                               override_num_blocks=min(len(plans), BLOCKS_PER_WORKER * workers))
    written = rows.map(_shard_task, fn_kwargs={"seq_len": seq_len, "settings": settings},
                       num_cpus=LIGHT_TASK_CPUS).take_all()
    entries = [json.loads(row["entry"]) for row in written]
    return sorted(entries, key=lambda e: (e["split"], e["first_block"]))


def _shard_task(row: dict, seq_len: int, settings: StorageConfig) -> dict:
    storage.configure(settings)
    plan = json.loads(row["plan"])
    plan["reads"] = [tuple(read) for read in plan["reads"]]
    return {"entry": json.dumps(write_shard(ShardPlan(**plan), seq_len))}
