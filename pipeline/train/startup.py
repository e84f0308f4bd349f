"""What a run does once before its first tick: how long each part took, and the tick-0 evaluation
that a sweep's trials share.

Rank 0 prints one line ("started in 14.2 s: trial driver 1.9 s, worker group 7.1 s, ...") and logs
each part as a `startup.<part>_s` metric at the run's first step. The parts before the rank existed
come from the driver as wall-clock marks (`WorkerPlan.marks`): `time.time()` in another process,
exact on one machine and as good as the nodes' clock sync on a cluster.

Every trial of a sweep evaluates the same model on the same eval subset before training (the
evaluation is noise-free and does not depend on the learning rate, σ or the seed), so the first
trial to do it stores the result under a key of everything that could change it, and the others
read it instead (`SharedFirstEval`). A plain `pipeline train` has no such store and evaluates.
"""

from __future__ import annotations

import hashlib
import json
import time

from pipeline import storage
from pipeline.config import Config

SHARED_TAG = "pipeline.first_eval"  # on a run whose tick-0 evaluation was read, not computed


def first_eval_key(cfg: Config, model_ref: str, data_fingerprint: str, eval_samples: int, world: int) -> str:
    """Everything the tick-0 eval loss (and sample generations) depends on; what a sweep varies
    (lr, σ, schedule, seed) is left out on purpose, but for a classifier `train.seed`, which draws
    its new head. The world size and micro batch are in because each rank's share of the eval subset
    is rounded down (`source.eval_batches`)."""
    t = cfg.train
    key = {"model_ref": model_ref, "model": cfg.model.model_dump(mode="json", exclude={"cache_dir"}),
           # Only where it matters: a causal LM's key stays what it was, so a sweep from before still finds its eval.
           **({"head_seed": t.seed} if cfg.model.task != "causal_lm" else {}),
           "data": data_fingerprint, "eval_samples": eval_samples, "world": world, "micro_batch": t.micro_batch_size,
           "zero_stage": t.zero_stage, "precision": t.precision, "use_gpu": t.use_gpu, "deepspeed": t.deepspeed,
           "kernel": cfg.kernel.model_dump(mode="json"),
           "samples": [cfg.tracking.sample_prompts, cfg.tracking.max_new_tokens] if cfg.data.has_examples else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class SharedFirstEval:
    """A sweep's tick-0 evaluation, stored once at `<directory>/<key>.json`. Rank 0 reads it and
    the ranks agree on what it read: the evaluation is a collective, so all ranks must skip it or none."""

    def __init__(self, directory: str, key: str, rank: int, world: int):
        self.location = storage.join(directory, f"{key}.json")
        self.rank, self.world = rank, world

    def load(self) -> tuple[dict, list | None] | None:
        """(eval metrics, sample generations) when another run stored them."""
        record = None
        if self.rank == 0 and storage.exists(self.location):
            record = json.loads(storage.read_text(self.location))
        if self.world > 1:
            import torch.distributed as dist

            shared = [record]
            dist.broadcast_object_list(shared, src=0)
            record = shared[0]
        return None if record is None else (record["metrics"], record["generations"])

    def store(self, metrics: dict, generations: list | None) -> None:
        if self.rank == 0:  # whole or not at all (storage.write_text): a reader never sees half of it
            storage.write_text(self.location, json.dumps({"metrics": metrics, "generations": generations}))


class Startup:
    """The parts of a run's start, in order: the driver's marks, then the rank's own `done(part)`."""

    def __init__(self, marks: tuple[tuple[str, float], ...] = (), shared: SharedFirstEval | None = None):
        now = time.time()
        self.parts: dict[str, float] = {}
        for index, (name, at) in enumerate(marks):  # each part lasts until the next mark, the last until now
            until = marks[index + 1][1] if index + 1 < len(marks) else now
            self.parts[name] = max(0.0, until - at)
        self.shared = shared
        self.first_eval = ""  # how the tick-0 evaluation was had, when not computed
        self._last = now

    def done(self, part: str) -> None:
        now = time.time()
        self.parts[part] = self.parts.get(part, 0.0) + now - self._last
        self._last = now

    def summary(self) -> str:
        total = sum(self.parts.values())
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.parts.items())
        return f"[pipeline] started in {total:.1f} s: {parts}" + (f" ({self.first_eval})" if self.first_eval else "")

    def metrics(self) -> dict[str, float]:
        metrics = {f"startup.{name.replace(' ', '_').lower()}_s": seconds for name, seconds in self.parts.items()}
        return {**metrics, "startup.total_s": sum(self.parts.values())}
